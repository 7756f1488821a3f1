"""KV caches: the `KVCache` value type, the transformers adapter and the wire codec."""
from agentmesh.cache.codec import (
    DEFAULT_MAX_BYTES, FORMAT_VERSION, CacheHeader, decode_cache, encode_cache, fp8_supported, read_header, wire_size)
from agentmesh.cache.kv import KVCache, ModelSignature

__all__ = [
    "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "CacheHeader", "KVCache", "ModelSignature", "decode_cache",
    "encode_cache", "fp8_supported", "read_header", "wire_size",
]
