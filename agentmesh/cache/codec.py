"""Wire codec for `KVCache`: bytes that can cross a network and be checked before they are trusted.

Payload layout (all integers little-endian):

    prefix  32 bytes  magic (8) | format version u16 | flags u16 (0) | header length u32 |
                      body length u64 | CRC-32 of the header u32 | reserved u32 (0)
    header            JSON (UTF-8, space-padded so the body starts 8-byte aligned): format version,
                      model signature, layer ids, per-layer (batch, heads, tokens, head_dim),
                      token span, wire and source dtypes, quantization, metadata tensors,
                      body length and the body checksum (xxh3-64; CRC-32 in version 2 payloads)
    body              a safetensors file: `k.{layer}`, `v.{layer}` (B, H, N, D) in the wire dtype,
                      `k_scale.{layer}`/`v_scale.{layer}` float32 for int8/fp8, and `token_ids`,
                      `positions`, `attention_mask` when the cache carries them; every tensor
                      starts aligned to its item size

Wire dtypes: "fp32", "bf16", "fp16" (a plain cast: bit-exact when it equals the source dtype or
is wider than it), "int8" and "fp8" (float8_e4m3fn) with one float32 scale per (batch, head)
("per_head": amax over tokens and head_dim) or per (batch, head, channel) ("per_channel": amax
over tokens). Error bounds, per element x, with s the scale of its group:

    int8: s = amax / 127, q = round(x / s);      |x - q*s| <= s/2
    fp8:  s = amax / 448, q = e4m3(x / s);       |x - q*s| <= |x| * 2**-4 + s * 2**-10

each up to float32 rounding (< 1e-5 relative), plus the rounding of the decode dtype when it is
narrower than float32 (unit roundoff 2**-8 for bf16, 2**-11 for fp16, times |x|).

Speed: encoding lays the payload out from the header alone, allocates it once and casts each
tensor straight into its place; decoding hashes the body once and returns tensors that view the
payload's own memory when the payload is writable (what `encode_cache` returns, a `bytearray`
or any writable memoryview), so a lossless round trip touches each byte three times (cast, hash,
hash). Read-only `bytes` are copied once, since torch cannot view immutable memory.

Decoding treats the payload as untrusted: the prefix, the sizes and `max_bytes` are checked before
anything is parsed, the header is validated against a strict schema, the body checksum must match,
and every safetensors entry (dtype, shape, offsets) is checked against the header before a single
tensor is built, so what is built never exceeds what the body holds. Nothing is unpickled. Every
failure is a `CodecError` with a one-line message.
"""
from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import orjson
import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, conint

from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import CacheError, CodecError

FORMAT_NAME = "agentmesh.kvcache"
# 3: the body checksum is xxh3-64 (was CRC-32 in 2, SHA-256 before); version 2 is still read.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
# PNG-style magic: a high-bit byte, CR LF and ^Z catch 7-bit and text-mode mangling.
MAGIC = b"\x89AMKV\r\n\x1a"
PREFIX = struct.Struct("<8sHHIQII")
DEFAULT_MAX_BYTES = 1 << 31
MAX_HEADER_BYTES = 16 << 20
MAX_LAYERS = 4096
_MAX_DIM = 1 << 31
_XXH3_PLACEHOLDER = "0" * 16

WireDtype = Literal["fp32", "bf16", "fp16", "int8", "fp8"]
ScaleAxis = Literal["per_head", "per_channel"]
Payload = bytes | bytearray | memoryview
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
    version: Literal[2, 3]
    signature: dict[str, Any] | None
    layer_ids: list[_Dim] = Field(min_length=1, max_length=MAX_LAYERS)  # type: ignore[valid-type]
    layers: list[LayerShape] = Field(min_length=1, max_length=MAX_LAYERS)
    source_dtype: Literal[tuple(_SOURCE_DTYPES)]  # type: ignore[valid-type]
    wire_dtype: Literal["fp32", "bf16", "fp16", "int8", "fp8"]
    quant: Quantization
    span: TokenSpan
    meta: dict[Literal["token_ids", "positions", "attention_mask"], TensorInfo]
    body_bytes: _Dim  # type: ignore[valid-type]
    # The checksum guards against corruption in transit and at rest; it is no signature (nor would
    # a SHA-256 be without a key). xxh3 runs near memory speed (~10x CRC-32); version 2 used CRC-32.
    body_xxh3: str | None = Field(default=None, pattern="^[0-9a-f]{16}$")
    body_crc32: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)


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
    return dtype.itemsize


def _wire_torch_dtype(wire: str) -> torch.dtype:
    if wire in _FLOAT_WIRE:
        return _FLOAT_WIRE[wire]
    if wire == "int8":
        return torch.int8
    if _FP8 is None:
        raise CodecError("wire dtype 'fp8' needs torch.float8_e4m3fn, which this torch build lacks; "
                         "use 'int8' or 'bf16'")
    return _FP8


def _scale_shape(shape: tuple[int, ...], axis: str) -> tuple[int, ...]:
    """(..., B, H, N, D) -> (..., B, H, 1, 1) per head or (..., B, H, 1, D) per channel."""
    return (*shape[:-2], 1, 1 if axis == "per_head" else shape[-1])


def _kv_names(layer_ids: Sequence[int], prefix: str = "") -> list[str]:
    """k.0, v.0, k.1, v.1, ...: the order in which the encoder lays keys and values out."""
    return [f"{kind}{prefix}.{lid}" for lid in layer_ids for kind in ("k", "v")]


def _back_to_back(spans: dict[str, tuple[int, int]], names: list[str]) -> bool:
    return all(spans[a][1] == spans[b][0] for a, b in zip(names, names[1:]))


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


def _quantize_into(out: torch.Tensor, x: torch.Tensor, scheme: str, axis: str) -> torch.Tensor:
    """Write x (..., B, H, N, D) float, quantized, into `out` (int8|fp8); return the float32
    scales (..., B, H, 1, 1|D)."""
    x32 = x.to(torch.float32)
    if x.shape[-2] == 0:  # amax over an empty token axis is undefined
        return torch.ones(_scale_shape(tuple(x.shape), axis), dtype=torch.float32)
    amax = x32.abs().amax(dim=(-2, -1) if axis == "per_head" else (-2,), keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        raise CodecError(f"cannot quantize a cache holding inf or nan to {scheme}; "
                         "send it as fp32, bf16 or fp16")
    scale = amax / _QMAX[scheme]
    # An all-zero group keeps q = 0 whatever the scale; 1 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x32.div_(scale) if x32 is not x else x32 / scale
    qmax = _QMAX[scheme]
    if scheme == "int8":
        y.round_()
    out.copy_(y.clamp_(-qmax, qmax))  # the cast to int8 / e4m3 happens in the copy
    return scale


def _write_kv(kv: KVCache, views: dict[str, torch.Tensor], run: torch.Tensor | None, scale_run: torch.Tensor | None,
              scheme: str, axis: str) -> None:
    """Write keys and values (quantized, with their scales, unless `scheme` is "none") into their
    places: through `run` (2L, B, H, N, D), when the layers lie back to back with one shape, in
    one op (and `scale_run` for the scales); else tensor by tensor into `views`."""
    tensors = [t for pair in zip(kv.keys, kv.values) for t in pair]
    if run is not None:
        on_cpu = tensors[0].device.type == "cpu"
        if scheme == "none":
            if on_cpu:
                torch.stack(tensors, out=run)  # the cast to the wire dtype happens in the stack
            else:
                run.copy_(torch.stack(tensors))
            return
        x = torch.empty(run.shape, dtype=torch.float32, device=tensors[0].device)
        scale_run.copy_(_quantize_into(run, torch.stack(tensors, out=x), scheme, axis))  # type: ignore[union-attr]
        return
    for name, t in zip(_kv_names(kv.layer_ids), tensors):
        if scheme == "none":
            views[name].copy_(t)
        else:
            kind, lid = name.split(".")
            views[f"{kind}_scale.{lid}"].copy_(_quantize_into(views[name], t, scheme, axis))


def _span(kv: KVCache) -> TokenSpan:
    start = stop = None
    if kv.positions is not None and kv.positions.numel() > 0:
        start = int(kv.positions.min())
        stop = int(kv.positions.max()) + 1
    return TokenSpan(tokens=kv.seq_len, start=start, stop=stop)


def _header_for(kv: KVCache, wire: str, int8_scale: str) -> CacheHeader:
    """The header of `kv`'s payload, all but its body checksum (a placeholder of the same width)."""
    source_name = str(kv.dtype).removeprefix("torch.")
    scheme = wire if wire in _QMAX else "none"
    shapes = [LayerShape(batch=b, heads=h, tokens=n, head_dim=d) for b, h, n, d in (k.shape for k in kv.keys)]
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
    header = CacheHeader(
        format=FORMAT_NAME, version=FORMAT_VERSION,
        signature=kv.signature.to_dict() if kv.signature is not None else None,
        layer_ids=list(kv.layer_ids), layers=shapes, source_dtype=source_name,  # type: ignore[arg-type]
        wire_dtype=wire,  # type: ignore[arg-type]
        quant=Quantization(scheme=scheme, axis=int8_scale if scheme != "none" else None,  # type: ignore[arg-type]
                           scale_dtype="float32" if scheme != "none" else None,
                           qmax=_QMAX.get(scheme)),
        span=_span(kv), meta=meta, body_bytes=0, body_xxh3=_XXH3_PLACEHOLDER,
    )
    return header


def _safetensors_table(entries: list[_Entry]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the safetensors header of `entries`, name -> (begin, end) in its data section).

    Widest dtype first, so every tensor starts aligned to its item size; the sort is stable, so
    the keys and values of successive layers (one dtype) stay back to back, as do their scales.
    """
    table: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for e in sorted(entries, key=lambda e: -_itemsize(e.dtype)):
        spans[e.name] = (offset, offset + e.nbytes)
        table[e.name] = {"dtype": _ST_NAME[e.dtype], "shape": list(e.shape), "data_offsets": list(spans[e.name])}
        offset += e.nbytes
    raw = orjson.dumps(table)
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


def _runs(header: CacheHeader, spans: dict[str, tuple[int, int]]) -> tuple[_Entry, _Entry | None, int, int] | None:
    """When every layer has one shape and the keys and values (and their scales) lie back to
    back in layer order, as `encode_cache` writes them: the entries of those two runs, as
    (2L, B, H, N, D) and (2L, B, H, 1, 1|D), and where each begins. Else None."""
    if len({layer.shape for layer in header.layers}) != 1:
        return None
    names = _kv_names(header.layer_ids)
    shape = (len(names), *header.layers[0].shape)
    run = _Entry("kv", _wire_torch_dtype(header.wire_dtype), shape)
    if header.quant.scheme == "none":
        return (run, None, spans[names[0]][0], 0) if _back_to_back(spans, names) else None
    scales = _kv_names(header.layer_ids, "_scale")
    if not (_back_to_back(spans, names) and _back_to_back(spans, scales)):
        return None
    scale_run = _Entry("scales", torch.float32, _scale_shape(shape, header.quant.axis or "per_head"))
    return run, scale_run, spans[names[0]][0], spans[scales[0]][0]


def _header_json(header: CacheHeader) -> bytes:
    raw = orjson.dumps(header.model_dump(mode="json", exclude={"body_crc32"}))
    return raw + b" " * (-(PREFIX.size + len(raw)) % 8)


def encode_cache(
    kv: KVCache,
    *,
    dtype: WireDtype | torch.dtype | None = "bf16",
    int8_scale: ScaleAxis = "per_head",
    layers: Sequence[int] | None = None,
) -> memoryview:
    """Serialize `kv` (or its `layers`, by model layer id) for the wire.

    `dtype` is the wire dtype (None: the cache's own fp32/bf16/fp16 dtype, lossless); `int8_scale` picks
    the scale groups of "int8" and "fp8" (see the module docstring for the error bounds). The
    cache's tensors are read, never modified; each is cast straight into its place in the one
    buffer returned: a writable, bytes-like `memoryview` (`len`, slices, `bytes(payload)`, socket
    and file writes), which `decode_cache` can view without a copy. It is not zero-filled first
    (a `bytearray` would be, at the cost of touching every page once more).
    """
    if sys.byteorder != "little":
        raise CodecError("the cache codec supports little-endian hosts only")
    if not isinstance(kv, KVCache):
        raise CodecError(f"encode_cache needs a KVCache, got {type(kv).__name__}")
    if kv.num_layers == 0:
        raise CodecError("cannot encode a KVCache with no layers")
    if layers is not None:
        try:
            kv = kv.select_layers(list(layers))
        except (CacheError, TypeError) as exc:
            raise CodecError(f"encode_cache: `layers` {layers!r}: {getattr(exc, 'message', exc)}") from None
        if kv.num_layers == 0:
            raise CodecError("encode_cache: `layers` is empty; name at least one layer id")
    if len(set(kv.layer_ids)) != len(kv.layer_ids):
        raise CodecError(f"encode_cache: layer ids {list(kv.layer_ids)} repeat a layer")
    source = kv.dtype
    if str(source).removeprefix("torch.") not in _SOURCE_DTYPES:
        raise CodecError(f"cannot encode a cache of dtype {source}; caches must be float32, bfloat16, "
                         "float16 or float64")
    for lid, k, v in zip(kv.layer_ids, kv.keys, kv.values):
        if k.dtype != source or v.dtype != source:
            raise CodecError(f"cache layer {lid} is {k.dtype}/{v.dtype} while layer {kv.layer_ids[0]} is "
                             f"{source}; convert the cache to one dtype first (KVCache.to(dtype=...))")
    wire = _normalize_wire(dtype, source)
    if int8_scale not in ("per_head", "per_channel"):
        raise CodecError(f"int8_scale {int8_scale!r} is not supported; use 'per_head' or 'per_channel'")

    header = _header_for(kv, wire, int8_scale)
    entries = _expected_entries(header)
    st_head, spans = _safetensors_table(entries)
    body_len = len(st_head) + sum(e.nbytes for e in entries)
    header = header.model_copy(update={"body_bytes": body_len})
    header_len = len(_header_json(header))
    body_start = PREFIX.size + header_len
    buf = memoryview(np.empty(body_start + body_len, dtype=np.uint8)).cast("B")
    buf[body_start:body_start + len(st_head)] = st_head
    data_start = body_start + len(st_head)
    runs = _runs(header, spans)
    if runs is None:
        views = {e.name: _view(buf, data_start + spans[e.name][0], e) for e in entries}
        run = scale_run = None
    else:
        run_entry, scale_entry, begin, scale_begin = runs
        views = {e.name: _view(buf, data_start + spans[e.name][0], e) for e in entries if e.name in header.meta}
        run = _view(buf, data_start + begin, run_entry)
        scale_run = None if scale_entry is None else _view(buf, data_start + scale_begin, scale_entry)
    _write_kv(kv, views, run, scale_run, header.quant.scheme, int8_scale)
    for name in header.meta:
        views[name].copy_(getattr(kv, name))

    digest = xxhash.xxh3_64_hexdigest(buf[body_start:])
    header_json = _header_json(header.model_copy(update={"body_xxh3": digest}))
    assert len(header_json) == header_len  # the digest has the placeholder's fixed width
    buf[PREFIX.size:body_start] = header_json
    PREFIX.pack_into(buf, 0, MAGIC, FORMAT_VERSION, 0, header_len, body_len, zlib.crc32(header_json), 0)
    return buf


def _payload_view(data: Any, caller: str) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise CodecError(f"{caller} needs the payload as bytes, bytearray or a contiguous memoryview, "
                         f"got {type(data).__name__}") from None


def _check_prefix(mv: memoryview, max_bytes: int) -> tuple[int, int, int]:
    """(format version, header length, body length) after checking magic, version and sizes."""
    size = len(mv)
    if size > max_bytes:
        raise CodecError(f"cache payload is {size} bytes, over the limit of {max_bytes} bytes",
                         hint="raise max_bytes if this cache is expected")
    if size < PREFIX.size:
        raise CodecError(f"cache payload truncated: {size} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, flags, header_len, body_len, crc, reserved = PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError(f"not an agentmesh cache payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise CodecError(f"cache payload format version {version} is not supported; this agentmesh reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}",
                         hint="run the same agentmesh version on both ends")
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
    return version, header_len, body_len


def _parse_header(raw: memoryview, version: int, body_len: int) -> CacheHeader:
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
    if header.version != version:
        raise CodecError(f"cache payload header says format version {header.version}; its prefix says {version}")
    checksum = "body_xxh3" if version >= 3 else "body_crc32"
    other = "body_crc32" if version >= 3 else "body_xxh3"
    if getattr(header, checksum) is None or getattr(header, other) is not None:
        raise CodecError(f"cache payload header of format version {version} must carry {checksum} "
                         f"and not {other}")
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


def _check_body(body: memoryview, header: CacheHeader) -> None:
    if header.body_xxh3 is not None:
        if xxhash.xxh3_64_hexdigest(body) != header.body_xxh3:
            raise CodecError("cache payload is corrupted: the xxh3 checksum of its body does not match its header")
    elif zlib.crc32(body) != header.body_crc32:
        raise CodecError("cache payload is corrupted: the CRC-32 of its body does not match its header")


def _parse_signature(data: dict[str, Any] | None) -> ModelSignature | None:
    if data is None:
        return None
    fields = ModelSignature.__dataclass_fields__
    required = set(fields) - {"rotary"}  # payloads written before rotary existed lack it
    if not required <= set(data) <= set(fields):
        raise CodecError(f"cache payload signature has keys {sorted(data)}; expected {sorted(fields)}")
    for name in sorted(required):
        want = int if fields[name].type in ("int", int) else str
        value = data[name]
        if type(value) is not want:
            raise CodecError(f"cache payload signature {name!r} is {value!r}; expected a {want.__name__}")
    try:
        return ModelSignature.from_dict(data)
    except ValueError as e:
        raise CodecError(f"cache payload signature: {e}") from None


def _check_expected(header: CacheHeader, sig: ModelSignature | None, expected: ModelSignature) -> None:
    if sig is None:
        raise CodecError(f"cache payload carries no model signature; expected one from {expected.name!r} "
                         f"(fingerprint {expected.fingerprint})",
                         hint="encode caches that carry their model's signature")
    if sig.fingerprint != expected.fingerprint:
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


def _address(buf: bytearray | memoryview) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() if len(buf) else 0


def _view(buf: bytearray | memoryview, begin: int, entry: _Entry, base: int | None = None) -> torch.Tensor:
    """The tensor `entry` over bytes begin.. of `buf`, without a copy; given `base`, the address of
    `buf`'s memory, a copy where the tensor would start unaligned to its item size."""
    count = math.prod(entry.shape)
    if count == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if base is not None and (base + begin) % _itemsize(entry.dtype):  # unaligned views are slow in some kernels
        return torch.frombuffer(bytearray(buf[begin:begin + entry.nbytes]), dtype=entry.dtype).reshape(entry.shape)
    return torch.frombuffer(buf, dtype=entry.dtype, count=count, offset=begin).reshape(entry.shape)


def _resolve_dtype(dtype: torch.dtype | str | None, source: torch.dtype) -> torch.dtype:
    if dtype is None:
        return source
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise CodecError(f"decode dtype {dtype} is not a floating point dtype")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPE_ALIASES:
        raise CodecError(f"decode dtype {dtype!r} is not supported; use one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[dtype]


def _check_limit(max_bytes: Any, caller: str) -> int:
    if type(max_bytes) is not int or max_bytes <= 0:
        raise CodecError(f"{caller}: max_bytes must be a positive int, got {max_bytes!r}")
    return max_bytes


def read_header(data: Payload, *, max_bytes: int = DEFAULT_MAX_BYTES) -> CacheHeader:
    """The validated header of a payload (prefix, sizes and schema checked; body not hashed)."""
    mv = _payload_view(data, "read_header")
    version, header_len, body_len = _check_prefix(mv, _check_limit(max_bytes, "read_header"))
    return _parse_header(mv[PREFIX.size:PREFIX.size + header_len], version, body_len)


def decode_cache(
    data: Payload,
    *,
    expected: ModelSignature | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> KVCache:
    """Rebuild a `KVCache` from `encode_cache` bytes, checking everything before trusting it.

    `expected`: the receiving model's signature; a payload from another model (fingerprint), with
    no signature, or with other layer/head/head_dim shapes is rejected. `max_bytes` bounds both
    the payload and the cache it decodes to. `dtype`: the dtype of the returned keys and values
    (default: the dtype the cache had before encoding). When the payload is writable and no
    conversion is asked for, the returned tensors view the payload's memory: do not reuse that
    buffer while the cache is alive. Raises `CodecError`.
    """
    if sys.byteorder != "little":
        raise CodecError("the cache codec supports little-endian hosts only")
    mv = _payload_view(data, "decode_cache")
    if expected is not None and not isinstance(expected, ModelSignature):
        raise CodecError(f"decode_cache: expected must be a ModelSignature, got {type(expected).__name__}")
    max_bytes = _check_limit(max_bytes, "decode_cache")
    version, header_len, body_len = _check_prefix(mv, max_bytes)
    header = _parse_header(mv[PREFIX.size:PREFIX.size + header_len], version, body_len)
    signature = _parse_signature(header.signature)
    if expected is not None:
        _check_expected(header, signature, expected)
    source = _SOURCE_DTYPES[header.source_dtype]
    target = _resolve_dtype(dtype, source)
    entries = _expected_entries(header)
    entries_by_name = {e.name: e for e in entries}
    body_start = PREFIX.size + header_len
    body = mv[body_start:]
    _check_body(body, header)
    data_start, spans = _check_safetensors(body, entries)
    # The entries now tile the body exactly; what they decode to (wider when the decode dtype is
    # wider than the wire's) must fit the same limit as the payload, before anything is allocated.
    decoded = sum(2 * math.prod(layer.shape) for layer in header.layers) * _itemsize(target) + sum(
        math.prod(info.shape) * _itemsize(_META_DTYPES[info.dtype]) for info in header.meta.values())
    if decoded > max_bytes:
        raise CodecError(f"cache payload decodes to {decoded} bytes of {str(target).removeprefix('torch.')}, "
                         f"over the limit of {max_bytes} bytes", hint="raise max_bytes if this cache is expected")

    if mv.readonly:  # torch cannot view immutable memory: one copy into memory we own
        buf: bytearray | memoryview = bytearray(body[data_start:])
        base = 0
    else:
        buf, base = mv, body_start + data_start
    address = _address(buf)
    quantized = header.quant.scheme != "none"
    runs = _runs(header, spans)
    if runs is not None:  # one view (and one dequantization) for every layer
        run_entry, scale_entry, begin, scale_begin = runs
        t = _view(buf, base + begin, run_entry, address)
        if scale_entry is not None:
            t = t.to(torch.float32).mul_(_view(buf, base + scale_begin, scale_entry, address))
        kv_list = list(t.to(device=device, dtype=target).unbind(0))
    else:
        kv_list = []
        for name in _kv_names(header.layer_ids):
            t = _view(buf, base + spans[name][0], entries_by_name[name], address)
            if quantized:
                kind, lid = name.split(".")
                scale = f"{kind}_scale.{lid}"
                t = t.to(torch.float32).mul_(_view(buf, base + spans[scale][0], entries_by_name[scale], address))
            kv_list.append(t.to(device=device, dtype=target))
    meta = {name: _view(buf, base + spans[name][0], entries_by_name[name], address).to(device=device)
            if name in header.meta else None for name in _META_NAMES}
    kv = KVCache(keys=tuple(kv_list[0::2]), values=tuple(kv_list[1::2]), signature=signature,
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
