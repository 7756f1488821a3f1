"""KV caches: the `KVCache` value type, the transformers adapter and the wire codec."""
from agentmesh.cache.kv import KVCache, ModelSignature

__all__ = ["KVCache", "ModelSignature"]
