"""Wire codec for `KVCache`: bytes that can cross a network and be checked before they are trusted.

Payload layout (all integers little-endian):

    prefix  32 bytes  magic (8) | format version u16 | flags u16 (0) | header length u32 |
                      body length u64 | CRC-32 of the header u32 | reserved u32 (0)
    header            JSON (UTF-8, space-padded so the body starts 8-byte aligned): format version,
                      model signature, layer ids, per-layer (batch, heads, tokens, head_dim),
                      token span, wire and source dtypes, quantization, metadata tensors,
                      body length and CRC-32 of the body
    body              a safetensors file: `k.{layer}`, `v.{layer}` (B, H, N, D) in the wire dtype,
                      `k_scale.{layer}`/`v_scale.{layer}` float32 for int8/fp8, and `token_ids`,
                      `positions`, `attention_mask` when the cache carries them

Wire dtypes: "fp32", "bf16", "fp16" (a plain cast: bit-exact when it equals the source dtype or
is wider than it), "int8" and "fp8" (float8_e4m3fn) with one float32 scale per (batch, head)
("per_head": amax over tokens and head_dim) or per (batch, head, channel) ("per_channel": amax
over tokens). Error bounds, per element x, with s the scale of its group:

    int8: s = amax / 127, q = round(x / s);      |x - q*s| <= s/2
    fp8:  s = amax / 448, q = e4m3(x / s);       |x - q*s| <= |x| * 2**-4 + s * 2**-10

each up to float32 rounding (< 1e-5 relative), plus the rounding of the decode dtype when it is
narrower than float32 (unit roundoff 2**-8 for bf16, 2**-11 for fp16, times |x|).

Decoding treats the payload as untrusted: the prefix, the sizes and `max_bytes` are checked before
anything is parsed, the header is validated against a strict schema, the body checksum must match,
and every safetensors entry (dtype, shape, offsets) is checked against the header before a single
tensor is built. Nothing is unpickled. Every failure is a `CodecError` with a one-line message.
"""
from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, conint

from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import CacheError, CodecError

FORMAT_NAME = "agentmesh.kvcache"
FORMAT_VERSION = 2  # 2: the body checksum is CRC-32 (was SHA-256)
# PNG-style magic: a high-bit byte, CR LF and ^Z catch 7-bit and text-mode mangling.
MAGIC = b"\x89AMKV\r\n\x1a"
PREFIX = struct.Struct("<8sHHIQII")
DEFAULT_MAX_BYTES = 1 << 31
MAX_HEADER_BYTES = 16 << 20
MAX_LAYERS = 4096
_MAX_DIM = 1 << 31

WireDtype = Literal["fp32", "bf16", "fp16", "int8", "fp8"]
ScaleAxis = Literal["per_head", "per_channel"]

_FLOAT_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FP8 = getattr(torch, "float8_e4m3fn", None)
_QMAX = {"int8": 127.0, "fp8": 448.0}
_SOURCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}
# Metadata tensors keep their dtype bit for bit; these are the dtypes they may arrive in.
_META_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
                "uint8": torch.uint8, "bool": torch.bool, "float32": torch.float32,
                "bfloat16": torch.bfloat16, "float16": torch.float16}
_META_NAMES = ("token_ids", "positions", "attention_mask")
_ST_NAME = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL"}
if _FP8 is not None:
    _ST_NAME[_FP8] = "F8_E4M3"
_DTYPE_ALIASES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                  "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                  "fp64": torch.float64, "float64": torch.float64}


def fp8_supported() -> bool:
    """Whether this torch build has float8_e4m3fn (the "fp8" wire dtype)."""
    return _FP8 is not None


# ---- header schema ---------------------------------------------------------------------------
_Dim = conint(strict=True, ge=0, lt=_MAX_DIM)
_PosDim = conint(strict=True, ge=1, lt=_MAX_DIM)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LayerShape(_Strict):
    batch: _Dim  # type: ignore[valid-type]
    heads: _PosDim  # type: ignore[valid-type]
    tokens: _Dim  # type: ignore[valid-type]
    head_dim: _PosDim  # type: ignore[valid-type]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.tokens, self.head_dim)


class TensorInfo(_Strict):
    dtype: Literal[tuple(_META_DTYPES)]  # type: ignore[valid-type]
    shape: list[_Dim] = Field(max_length=4)  # type: ignore[valid-type]


class Quantization(_Strict):
    scheme: Literal["none", "int8", "fp8"]
    axis: ScaleAxis | None = None
    scale_dtype: Literal["float32"] | None = None
    qmax: float | None = None


class TokenSpan(_Strict):
    """`tokens`: the longest layer's token count; `start`/`stop`: min and max+1 of `positions`."""

    tokens: _Dim  # type: ignore[valid-type]
    start: int | None = None
    stop: int | None = None


class CacheHeader(_Strict):
    """The JSON header of a cache payload, as validated on decode."""

    format: Literal["agentmesh.kvcache"]
    version: Literal[2]
    signature: dict[str, Any] | None
    layer_ids: list[_Dim] = Field(min_length=1, max_length=MAX_LAYERS)  # type: ignore[valid-type]
    layers: list[LayerShape] = Field(min_length=1, max_length=MAX_LAYERS)
    source_dtype: Literal[tuple(_SOURCE_DTYPES)]  # type: ignore[valid-type]
    wire_dtype: Literal["fp32", "bf16", "fp16", "int8", "fp8"]
    quant: Quantization
    span: TokenSpan
    meta: dict[Literal["token_ids", "positions", "attention_mask"], TensorInfo]
    body_bytes: _Dim  # type: ignore[valid-type]
    # CRC-32 guards against corruption in transit and at rest; it is no signature (nor would a
    # SHA-256 be without a key), and at 3x its speed it keeps the codec above 1 GB/s.
    body_crc32: int = Field(ge=0, le=0xFFFFFFFF)


@dataclass(frozen=True)
class _Entry:
    """One tensor of the safetensors body, as the header says it must be."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _wire_torch_dtype(wire: str) -> torch.dtype:
    if wire in _FLOAT_WIRE:
        return _FLOAT_WIRE[wire]
    if wire == "int8":
        return torch.int8
    if _FP8 is None:
        raise CodecError("wire dtype 'fp8' needs torch.float8_e4m3fn, which this torch build lacks; "
                         "use 'int8' or 'bf16'")
    return _FP8


def _scale_shape(shape: tuple[int, int, int, int], axis: str) -> tuple[int, int, int, int]:
    b, h, _, d = shape
    return (b, h, 1, 1) if axis == "per_head" else (b, h, 1, d)


def _expected_entries(header: CacheHeader) -> list[_Entry]:
    wire = _wire_torch_dtype(header.wire_dtype)
    out: list[_Entry] = []
    for lid, layer in zip(header.layer_ids, header.layers):
        out += [_Entry(f"k.{lid}", wire, layer.shape), _Entry(f"v.{lid}", wire, layer.shape)]
        if header.quant.scheme != "none":
            scale = _scale_shape(layer.shape, header.quant.axis or "per_head")
            out += [_Entry(f"k_scale.{lid}", torch.float32, scale),
                    _Entry(f"v_scale.{lid}", torch.float32, scale)]
    for name, info in header.meta.items():
        out.append(_Entry(name, _META_DTYPES[info.dtype], tuple(info.shape)))
    return out


# ---- encode ------------------------------------------------------------------------------------
def _normalize_wire(dtype: str | torch.dtype | None, source: torch.dtype) -> str:
    if dtype is None:
        dtype = source
    if isinstance(dtype, torch.dtype):
        for name, dt in _FLOAT_WIRE.items():
            if dt == dtype:
                return name
        if _FP8 is not None and dtype == _FP8:
            return "fp8"
        if dtype == torch.int8:
            return "int8"
        raise CodecError(f"wire dtype {dtype} is not supported; use one of fp32, bf16, fp16, int8, fp8")
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    if name not in ("fp32", "bf16", "fp16", "int8", "fp8"):
        raise CodecError(f"wire dtype {dtype!r} is not supported; use one of fp32, bf16, fp16, int8, fp8")
    return name


def _quantize(x: torch.Tensor, scheme: str, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) float -> (q (B, H, N, D) int8|fp8, scale (B, H, 1, 1|D) float32)."""
    x32 = x.to(torch.float32)
    scale_shape = _scale_shape(tuple(x.shape), axis)  # type: ignore[arg-type]
    if x.shape[2] == 0:  # amax over an empty token axis is undefined
        scale = torch.ones(scale_shape, dtype=torch.float32)
    else:
        dims = (2, 3) if axis == "per_head" else (2,)
        amax = x32.abs().amax(dim=dims, keepdim=True)
        if not bool(torch.isfinite(amax).all()):
            raise CodecError(f"cannot quantize a cache holding inf or nan to {scheme}; "
                             "send it as fp32, bf16 or fp16")
        scale = amax / _QMAX[scheme]
        # An all-zero group keeps q = 0 whatever the scale; 1 avoids dividing by zero.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x32.div_(scale) if x32 is not x else x32 / scale
    qmax = _QMAX[scheme]
    if scheme == "int8":
        q = y.round_().clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = y.clamp_(-qmax, qmax).to(_FP8)
    return q, scale.contiguous()


def _as_wire(t: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous, grad-free tensor that owns its whole data (so its bytes can be read)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _span(kv: KVCache) -> TokenSpan:
    start = stop = None
    if kv.positions is not None and kv.positions.numel() > 0:
        start = int(kv.positions.min())
        stop = int(kv.positions.max()) + 1
    return TokenSpan(tokens=kv.seq_len, start=start, stop=stop)


def encode_cache(
    kv: KVCache,
    *,
    dtype: WireDtype | torch.dtype | None = "bf16",
    int8_scale: ScaleAxis = "per_head",
    layers: Sequence[int] | None = None,
) -> bytes:
    """Serialize `kv` (or its `layers`, by model layer id) for the wire.

    `dtype` is the wire dtype (None: the cache's own fp32/bf16/fp16 dtype, lossless); `int8_scale` picks
    the scale groups of "int8" and "fp8" (see the module docstring for the error bounds). The
    cache's tensors are read, never modified; the bytes are assembled with one copy.
    """
    if sys.byteorder != "little":
        raise CodecError("the cache codec supports little-endian hosts only")
    if kv.num_layers == 0:
        raise CodecError("cannot encode a KVCache with no layers")
    if layers is not None:
        try:
            kv = kv.select_layers(list(layers))
        except CacheError as exc:
            raise CodecError(f"encode_cache: {exc.message}") from None
        if kv.num_layers == 0:
            raise CodecError("encode_cache: `layers` is empty; name at least one layer id")
    if len(set(kv.layer_ids)) != len(kv.layer_ids):
        raise CodecError(f"encode_cache: layer ids {list(kv.layer_ids)} repeat a layer")
    source = kv.keys[0].dtype
    source_name = str(source).removeprefix("torch.")
    if source_name not in _SOURCE_DTYPES:
        raise CodecError(f"cannot encode a cache of dtype {source}; caches must be float32, bfloat16, "
                         "float16 or float64")
    for lid, k in zip(kv.layer_ids, kv.keys):
        if k.dtype != source:
            raise CodecError(f"cache layer {lid} is {k.dtype} while layer {kv.layer_ids[0]} is {source}; "
                             "convert the cache to one dtype first (KVCache.to(dtype=...))")
    wire = _normalize_wire(dtype, source)
    if int8_scale not in ("per_head", "per_channel"):
        raise CodecError(f"int8_scale {int8_scale!r} is not supported; use 'per_head' or 'per_channel'")
    wire_dt = _wire_torch_dtype(wire)
    scheme = wire if wire in _QMAX else "none"

    tensors: list[tuple[str, torch.Tensor]] = []
    shapes: list[LayerShape] = []
    for lid, k, v in zip(kv.layer_ids, kv.keys, kv.values):
        b, h, n, d = k.shape
        shapes.append(LayerShape(batch=b, heads=h, tokens=n, head_dim=d))
        if scheme == "none":
            tensors += [(f"k.{lid}", _as_wire(k.to(wire_dt))), (f"v.{lid}", _as_wire(v.to(wire_dt)))]
        else:
            qk, sk = _quantize(_as_wire(k), scheme, int8_scale)
            qv, sv = _quantize(_as_wire(v), scheme, int8_scale)
            tensors += [(f"k.{lid}", qk), (f"v.{lid}", qv), (f"k_scale.{lid}", sk), (f"v_scale.{lid}", sv)]
    meta: dict[str, TensorInfo] = {}
    for name in _META_NAMES:
        t = getattr(kv, name)
        if t is None:
            continue
        dname = str(t.dtype).removeprefix("torch.")
        if dname not in _META_DTYPES or t.dim() > 4:
            raise CodecError(f"cannot encode {name} of dtype {t.dtype} and {t.dim()} dims; "
                             f"use one of {sorted(_META_DTYPES)} with at most 4 dims")
        meta[name] = TensorInfo(dtype=dname, shape=list(t.shape))  # type: ignore[arg-type]
        tensors.append((name, _as_wire(t)))

    body_parts = _safetensors_parts(tensors)
    crc = 0
    for part in body_parts:
        crc = zlib.crc32(part, crc)
    body_bytes = sum(len(p) for p in body_parts)
    header = CacheHeader(
        format=FORMAT_NAME, version=FORMAT_VERSION,
        signature=kv.signature.to_dict() if kv.signature is not None else None,
        layer_ids=list(kv.layer_ids), layers=shapes, source_dtype=source_name,  # type: ignore[arg-type]
        wire_dtype=wire,  # type: ignore[arg-type]
        quant=Quantization(scheme=scheme, axis=int8_scale if scheme != "none" else None,
                           scale_dtype="float32" if scheme != "none" else None,
                           qmax=_QMAX.get(scheme)),
        span=_span(kv), meta=meta, body_bytes=body_bytes, body_crc32=crc,  # type: ignore[arg-type]
    )
    header_json = orjson.dumps(header.model_dump(mode="json"))
    header_json += b" " * (-(PREFIX.size + len(header_json)) % 8)
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_json), body_bytes,
                         zlib.crc32(header_json), 0)
    return b"".join([prefix, header_json, *body_parts])


def _safetensors_parts(tensors: list[tuple[str, torch.Tensor]]) -> list[memoryview | bytes]:
    """A safetensors file as a list of buffers (header, then each tensor's bytes, uncopied).

    Tensors are laid out widest dtype first, so every tensor starts aligned to its item size.
    """
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i][1].element_size())
    entries: dict[str, Any] = {}
    data: list[memoryview] = []
    offset = 0
    for i in order:
        name, t = tensors[i]
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        data.append(_raw(t))
        offset += nbytes
    st_header = orjson.dumps(entries)
    st_header += b" " * (-len(st_header) % 8)
    return [struct.pack("<Q", len(st_header)), st_header, *data]


# ---- decode ------------------------------------------------------------------------------------
def _check_prefix(mv: memoryview, max_bytes: int) -> tuple[int, int]:
    """(header length, body length) after checking magic, version and sizes."""
    size = len(mv)
    if size > max_bytes:
        raise CodecError(f"cache payload is {size} bytes, over the limit of {max_bytes} bytes",
                         hint="raise max_bytes if this cache is expected")
    if size < PREFIX.size:
        raise CodecError(f"cache payload truncated: {size} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, flags, header_len, body_len, crc, reserved = PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError(f"not an agentmesh cache payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"cache payload format version {version} is not supported; this agentmesh reads "
                         f"version {FORMAT_VERSION}", hint="run the same agentmesh version on both ends")
    if flags != 0 or reserved != 0:
        raise CodecError(f"cache payload has flags {flags} and reserved {reserved}; both must be 0")
    if header_len > MAX_HEADER_BYTES:
        raise CodecError(f"cache payload header says {header_len} bytes, over the limit of {MAX_HEADER_BYTES}")
    expected = PREFIX.size + header_len + body_len
    if expected > max_bytes:
        raise CodecError(f"cache payload header says {expected} bytes, over the limit of {max_bytes} bytes",
                         hint="raise max_bytes if this cache is expected")
    if size < expected:
        raise CodecError(f"cache payload truncated: header says {expected} bytes, got {size}")
    if size > expected:
        raise CodecError(f"cache payload has {size - expected} trailing bytes: header says {expected} "
                         f"bytes, got {size}")
    if zlib.crc32(mv[PREFIX.size:PREFIX.size + header_len]) != crc:
        raise CodecError("cache payload header is corrupted: its CRC-32 does not match the prefix")
    return header_len, body_len


def _parse_header(raw: memoryview, body_len: int) -> CacheHeader:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"cache payload header is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CodecError(f"cache payload header must be a JSON object, got {type(data).__name__}")
    try:
        header = CacheHeader.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "header"
        raise CodecError(f"cache payload header field {where!r} is invalid: {err['msg']} "
                         f"({exc.error_count()} error(s))") from None
    if header.body_bytes != body_len:
        raise CodecError(f"cache payload header says the body is {header.body_bytes} bytes; "
                         f"the prefix says {body_len}")
    if len(header.layers) != len(header.layer_ids):
        raise CodecError(f"cache payload header lists {len(header.layer_ids)} layer ids and "
                         f"{len(header.layers)} layer shapes")
    if len(set(header.layer_ids)) != len(header.layer_ids):
        raise CodecError(f"cache payload header repeats a layer id: {header.layer_ids}")
    batches = {layer.batch for layer in header.layers}
    if len(batches) != 1:
        raise CodecError(f"cache payload layers disagree on the batch size: {sorted(batches)}")
    (batch,) = batches
    for name, info in header.meta.items():
        if not info.shape or info.shape[0] != batch:
            raise CodecError(f"cache payload {name} has shape {info.shape}; expected batch {batch} first")
    if header.span.tokens != max(layer.tokens for layer in header.layers):
        raise CodecError(f"cache payload span says {header.span.tokens} tokens; its layers hold "
                         f"{max(layer.tokens for layer in header.layers)}")
    scheme, wire = header.quant.scheme, header.wire_dtype
    if (scheme == "none") != (wire in _FLOAT_WIRE) or (scheme != "none" and scheme != wire):
        raise CodecError(f"cache payload wire dtype {wire} does not match quantization {scheme!r}")
    if scheme != "none" and (header.quant.axis is None or header.quant.scale_dtype != "float32"
                             or header.quant.qmax != _QMAX[scheme]):
        raise CodecError(f"cache payload {scheme} quantization needs axis, float32 scales and "
                         f"qmax {_QMAX[scheme]}; got {header.quant.model_dump()}")
    return header


def _parse_signature(data: dict[str, Any] | None) -> ModelSignature | None:
    if data is None:
        return None
    fields = ModelSignature.__dataclass_fields__
    if set(data) != set(fields):
        raise CodecError(f"cache payload signature has keys {sorted(data)}; expected {sorted(fields)}")
    for name, f in fields.items():
        want = int if f.type in ("int", int) else str
        value = data[name]
        if type(value) is not want:
            raise CodecError(f"cache payload signature {name!r} is {value!r}; expected a {want.__name__}")
    return ModelSignature.from_dict(data)


def _check_expected(header: CacheHeader, sig: ModelSignature | None, expected: ModelSignature) -> None:
    if sig is not None and sig.fingerprint != expected.fingerprint:
        raise CodecError(f"cache payload was made by model {sig.name!r} (fingerprint {sig.fingerprint}); "
                         f"expected {expected.name!r} (fingerprint {expected.fingerprint})")
    for lid, layer in zip(header.layer_ids, header.layers):
        if lid >= expected.num_layers or layer.heads != expected.num_kv_heads \
                or layer.head_dim != expected.head_dim:
            raise CodecError(
                f"cache payload layer {lid} has {layer.heads} heads of dim {layer.head_dim}; model "
                f"{expected.name!r} has {expected.num_layers} layers of {expected.num_kv_heads} heads "
                f"of dim {expected.head_dim}")


def _check_safetensors(body: memoryview, entries: list[_Entry]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(offset of the data section in `body`, name -> (begin, end) in it), all checked."""
    if len(body) < 8:
        raise CodecError(f"cache payload body is {len(body)} bytes, too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", body, 0)
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise CodecError(f"cache payload safetensors header says {n} bytes; the body holds {len(body) - 8}")
    try:
        table = orjson.loads(body[8:8 + n])
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"cache payload safetensors header is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise CodecError("cache payload safetensors header must be a JSON object")
    table.pop("__metadata__", None)
    want = {e.name: e for e in entries}
    if set(table) != set(want):
        missing, extra = sorted(set(want) - set(table)), sorted(set(table) - set(want))
        raise CodecError(f"cache payload tensors do not match its header: missing {missing}, unexpected {extra}")
    data_len = len(body) - 8 - n
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in want.items():
        info = table[name]
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CodecError(f"cache payload tensor {name!r} has a malformed safetensors entry")
        if info["dtype"] != _ST_NAME[entry.dtype]:
            raise CodecError(f"cache payload tensor {name!r} is {info['dtype']}; the header says "
                             f"{_ST_NAME[entry.dtype]}")
        if info["shape"] != list(entry.shape):
            raise CodecError(f"cache payload tensor {name!r} has shape {info['shape']}; the header says "
                             f"{list(entry.shape)}")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len and offs[1] - offs[0] == entry.nbytes):
            raise CodecError(f"cache payload tensor {name!r} has data offsets {offs}; expected "
                             f"{entry.nbytes} bytes inside a {data_len}-byte data section")
        spans[name] = (offs[0], offs[1])
    # The data section must be tiled exactly: no gaps (hidden bytes) and no overlaps.
    pos = 0
    for begin, end in sorted(spans.values()):
        if begin != pos:
            raise CodecError(f"cache payload tensors overlap or leave a gap at byte {pos} of the data section")
        pos = end
    if pos != data_len:
        raise CodecError(f"cache payload data section is {data_len} bytes; its tensors cover {pos}")
    return 8 + n, spans


def _view(buf: bytearray, begin: int, end: int, entry: _Entry) -> torch.Tensor:
    if end == begin:
        return torch.empty(entry.shape, dtype=entry.dtype)
    size = _itemsize(entry.dtype)
    if begin % size:  # an unaligned view would be slow or invalid for some kernels
        return torch.frombuffer(bytearray(buf[begin:end]), dtype=entry.dtype).reshape(entry.shape)
    return torch.frombuffer(buf, dtype=entry.dtype, count=(end - begin) // size,
                            offset=begin).reshape(entry.shape)


def _resolve_dtype(dtype: torch.dtype | str | None, source: torch.dtype) -> torch.dtype:
    if dtype is None:
        return source
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise CodecError(f"decode dtype {dtype} is not a floating point dtype")
        return dtype
    if dtype not in _DTYPE_ALIASES:
        raise CodecError(f"decode dtype {dtype!r} is not supported; use one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[dtype]


def read_header(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> CacheHeader:
    """The validated header of a payload (prefix, sizes and schema checked; body not hashed)."""
    mv = memoryview(data).cast("B")
    header_len, body_len = _check_prefix(mv, max_bytes)
    return _parse_header(mv[PREFIX.size:PREFIX.size + header_len], body_len)


def decode_cache(
    data: bytes | bytearray | memoryview,
    *,
    expected: ModelSignature | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> KVCache:
    """Rebuild a `KVCache` from `encode_cache` bytes, checking everything before trusting it.

    `expected`: the receiving model's signature; a payload from another model (fingerprint) or
    with other layer/head/head_dim shapes is rejected. `dtype`: the dtype of the returned keys
    and values (default: the dtype the cache had before encoding). Raises `CodecError`.
    """
    if sys.byteorder != "little":
        raise CodecError("the cache codec supports little-endian hosts only")
    mv = memoryview(data).cast("B")
    header_len, body_len = _check_prefix(mv, max_bytes)
    header = _parse_header(mv[PREFIX.size:PREFIX.size + header_len], body_len)
    signature = _parse_signature(header.signature)
    if expected is not None:
        _check_expected(header, signature, expected)
    entries = _expected_entries(header)
    body = mv[PREFIX.size + header_len:]
    if zlib.crc32(body) != header.body_crc32:
        raise CodecError("cache payload is corrupted: the CRC-32 of its body does not match its header")
    data_start, spans = _check_safetensors(body, entries)

    # One copy into memory we own; every tensor is a view into it (no per-tensor allocations).
    buf = bytearray(body[data_start:])
    tensors = {e.name: _view(buf, *spans[e.name], e) for e in entries}
    source = _SOURCE_DTYPES[header.source_dtype]
    target = _resolve_dtype(dtype, source)
    keys, values = [], []
    for lid in header.layer_ids:
        for name, out in (("k", keys), ("v", values)):
            t = tensors[f"{name}.{lid}"]
            if header.quant.scheme != "none":
                t = t.to(torch.float32).mul_(tensors[f"{name}_scale.{lid}"])
            out.append(t.to(device=device, dtype=target))
    meta = {name: tensors[name].to(device=device) if name in tensors else None for name in _META_NAMES}
    kv = KVCache(keys=tuple(keys), values=tuple(values), signature=signature,
                 layer_ids=tuple(header.layer_ids), **meta)
    if _span(kv) != header.span:
        raise CodecError(f"cache payload span {header.span.model_dump()} does not match its positions "
                         f"{_span(kv).model_dump()}")
    return kv


def wire_size(kv: KVCache, *, dtype: WireDtype | torch.dtype | None = "bf16",
              int8_scale: ScaleAxis = "per_head", layers: Sequence[int] | None = None) -> int:
    """Bytes of tensor data `encode_cache` would send (the small JSON headers not included)."""
    if layers is not None:
        kv = kv.select_layers(list(layers))
    if kv.num_layers == 0:
        return 0
    wire = _normalize_wire(dtype, kv.keys[0].dtype)
    total = 0
    for k in kv.keys:
        total += 2 * k.numel() * _itemsize(_wire_torch_dtype(wire))
        if wire in _QMAX:
            total += 2 * math.prod(_scale_shape(tuple(k.shape), int8_scale)) * 4  # type: ignore[arg-type]
    for name in _META_NAMES:
        t = getattr(kv, name)
        if t is not None:
            total += t.numel() * t.element_size()
    return total
