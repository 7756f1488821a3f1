"""The KV cache wire codec: exact round trips, quantization bounds, and rejection of bad payloads."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import orjson
import pytest
import torch
import xxhash
from safetensors.torch import load as st_load

from agentmesh.cache.codec import (
    FORMAT_VERSION, MAGIC, PREFIX, decode_cache, encode_cache, fp8_supported, read_header, wire_size)
from agentmesh.cache.kv import KVCache, ModelSignature
from agentmesh.errors import CodecError
from buffers import inside

SIG = ModelSignature(name="tiny-a", model_type="qwen3", num_layers=4, num_kv_heads=2, head_dim=8,
                     vocab_size=100, fingerprint="a" * 16)
OTHER = ModelSignature(name="tiny-b", model_type="llama", num_layers=4, num_kv_heads=2, head_dim=8,
                       vocab_size=100, fingerprint="b" * 16)


def make_cache(dtype=torch.float32, *, batch=2, tokens=7, layers=4, seed=0, meta=True) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, SIG.num_kv_heads, tokens, SIG.head_dim)
    keys = [torch.randn(shape, generator=g).to(dtype) * 3 for _ in range(layers)]
    values = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    extra = {}
    if meta:
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[0, :2] = 0  # left padding in the first row
        extra = dict(token_ids=torch.randint(0, 100, (batch, tokens), generator=g),
                     positions=(mask.cumsum(1) - 1).clamp(min=0) + 3, attention_mask=mask)
    return KVCache(keys=keys, values=values, signature=SIG, **extra)


def split(payload: bytes) -> tuple[tuple, dict, bytes]:
    fields = PREFIX.unpack_from(payload, 0)
    header_len = fields[3]
    header = orjson.loads(payload[PREFIX.size:PREFIX.size + header_len])
    return fields, header, bytes(payload[PREFIX.size + header_len:])


def rebuild(fields: tuple, header: dict, body: bytes) -> bytes:
    """A payload with a rewritten header and a correct CRC, as a forger would make it."""
    raw = orjson.dumps(header)
    magic, version, flags, _, _, _, reserved = fields
    return PREFIX.pack(magic, version, flags, len(raw), len(body), zlib.crc32(raw), reserved) + raw + body


def assert_same(a: KVCache, b: KVCache) -> None:
    assert a.layer_ids == b.layer_ids
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)
    for name in ("token_ids", "positions", "attention_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,wire", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                                        (torch.float16, "fp16")])
def test_round_trip_is_bit_exact_when_wire_dtype_is_the_source_dtype(dtype, wire):
    kv = make_cache(dtype)
    out = decode_cache(encode_cache(kv, dtype=wire), expected=SIG)
    assert_same(kv, out)
    assert out.signature == SIG
    # bit-exact, not merely equal: compare raw bits (distinguishes -0.0 and nan payloads)
    for x, y in zip(kv.keys, out.keys):
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(x.view(bits), y.view(bits))


def test_source_dtype_is_the_default_decode_dtype_and_widening_is_exact():
    kv = make_cache(torch.bfloat16)
    payload = encode_cache(kv, dtype="fp32")
    assert read_header(payload).wire_dtype == "fp32"
    assert_same(kv, decode_cache(payload))
    as_fp32 = decode_cache(payload, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.keys[0], kv.keys[0].float())
    lossless = encode_cache(kv, dtype=None)  # None: keep the cache's own dtype
    assert read_header(lossless).wire_dtype == "bf16"


def test_cache_without_metadata_or_signature_round_trips():
    kv = make_cache(meta=False).replace(signature=None)
    out = decode_cache(encode_cache(kv, dtype="fp32"))
    assert_same(kv, out)
    assert out.signature is None and out.token_ids is None


def test_payload_without_signature_is_rejected_when_a_model_is_expected():
    anonymous = encode_cache(make_cache().replace(signature=None), dtype="bf16")
    with pytest.raises(CodecError, match="carries no model signature; expected one from 'tiny-a'"):
        decode_cache(anonymous, expected=SIG)
    # a forger who nulls the signature of a real payload gets the same answer
    fields, header, body = split(encode_cache(make_cache(), dtype="bf16"))
    header["signature"] = None
    with pytest.raises(CodecError, match="carries no model signature"):
        decode_cache(rebuild(fields, header, body), expected=SIG)


def test_bf16_wire_from_fp32_source_is_a_plain_cast():
    kv = make_cache(torch.float32)
    out = decode_cache(encode_cache(kv, dtype="bf16"))
    assert out.dtype == torch.float32
    assert torch.equal(out.values[2], kv.values[2].to(torch.bfloat16).float())


def test_views_of_a_larger_cache_round_trip():
    kv = make_cache(torch.bfloat16, tokens=12)
    window = kv.slice_tokens(3, 9)  # non-contiguous views; positions expanded from a broadcast
    window = window.replace(positions=torch.arange(3, 9).expand(2, 6))
    assert not window.keys[0].is_contiguous()
    out = decode_cache(encode_cache(window, dtype="bf16"))
    assert_same(window, out)
    assert read_header(encode_cache(window)).span.model_dump() == {"tokens": 6, "start": 3, "stop": 9}


def test_empty_token_axis_round_trips():
    kv = make_cache(tokens=0, meta=False)
    for wire in ("bf16", "int8"):
        out = decode_cache(encode_cache(kv, dtype=wire))
        assert out.keys[0].shape == (2, 2, 0, 8)


def test_layer_subset_sends_only_those_layers():
    kv = make_cache(torch.bfloat16, tokens=64)
    full, part = encode_cache(kv, dtype="bf16"), encode_cache(kv, dtype="bf16", layers=[3, 1])
    out = decode_cache(part, expected=SIG)
    assert out.layer_ids == (3, 1)
    assert torch.equal(out.layer(1)[0], kv.layer(1)[0]) and torch.equal(out.layer(3)[1], kv.layer(3)[1])
    assert len(part) < 0.6 * len(full)
    assert wire_size(kv, dtype="bf16", layers=[3, 1]) < wire_size(kv, dtype="bf16")
    with pytest.raises(CodecError, match="not layer 7"):
        encode_cache(kv, layers=[7])


def test_body_is_a_plain_safetensors_file():
    kv = make_cache(torch.float16)
    payload = encode_cache(kv, dtype="fp16")
    tensors = st_load(split(payload)[2])
    assert torch.equal(tensors["k.2"], kv.keys[2]) and torch.equal(tensors["positions"], kv.positions)


# ---- quantization ----------------------------------------------------------------------------
def _group_scale(x: torch.Tensor, axis: str, qmax: float) -> torch.Tensor:
    dims = (2, 3) if axis == "per_head" else (2,)
    return x.abs().amax(dim=dims, keepdim=True) / qmax


@pytest.mark.parametrize("axis", ["per_head", "per_channel"])
def test_int8_error_is_within_half_a_scale_step(axis):
    kv = make_cache(torch.float32, tokens=64)
    payload = encode_cache(kv, dtype="int8", int8_scale=axis)
    header = read_header(payload)
    assert header.quant.scheme == "int8" and header.quant.axis == axis
    out = decode_cache(payload, expected=SIG)
    assert out.dtype == torch.float32
    for x, y in zip((*kv.keys, *kv.values), (*out.keys, *out.values)):
        bound = _group_scale(x, axis, 127.0) / 2 * (1 + 1e-5)
        err = (x - y).abs()
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
        assert err.max() > 0  # it really was quantized
    assert_same(kv.replace(keys=out.keys, values=out.values), out)  # metadata stays exact
    assert len(payload) < 0.4 * len(encode_cache(kv, dtype="fp32"))


def test_per_channel_scales_beat_per_head_on_channel_outliers():
    kv = make_cache(torch.float32, meta=False)
    # One key channel far larger than the rest, as real key caches have.
    keys = tuple(k.clone() for k in kv.keys)
    for k in keys:
        k[..., 5] = 200.0
    kv = kv.replace(keys=keys)
    err = {}
    for axis in ("per_head", "per_channel"):
        out = decode_cache(encode_cache(kv, dtype="int8", int8_scale=axis))
        err[axis] = max((a - b).abs()[..., :5].max().item() for a, b in zip(kv.keys, out.keys))
    assert err["per_channel"] < err["per_head"] / 5


def test_int8_decodes_into_the_source_dtype_within_its_rounding():
    kv = make_cache(torch.bfloat16)
    out = decode_cache(encode_cache(kv, dtype="int8", int8_scale="per_channel"))
    assert out.dtype == torch.bfloat16
    for x, y in zip(kv.keys, out.keys):
        x32 = x.float()
        bound = _group_scale(x32, "per_channel", 127.0) / 2 * (1 + 1e-5) + x32.abs() * 2 ** -8 * 1.01
        assert bool(((x32 - y.float()).abs() <= bound).all())


def test_int8_refuses_non_finite_values():
    kv = make_cache()
    bad = kv.keys[0].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(CodecError, match="inf or nan"):
        encode_cache(kv.replace(keys=(bad, *kv.keys[1:])), dtype="int8")


@pytest.mark.skipif(not fp8_supported(), reason="torch build without float8_e4m3fn")
@pytest.mark.parametrize("axis", ["per_head", "per_channel"])
def test_fp8_error_is_within_its_relative_bound(axis):
    kv = make_cache(torch.float32, tokens=64)
    payload = encode_cache(kv, dtype="fp8", int8_scale=axis)
    out = decode_cache(payload)
    for x, y in zip((*kv.keys, *kv.values), (*out.keys, *out.values)):
        s = _group_scale(x, axis, 448.0)
        bound = (x.abs() * 2 ** -4 + s * 2 ** -10) * (1 + 1e-5)
        assert bool(((x - y).abs() <= bound).all())
    assert len(payload) < 0.4 * len(encode_cache(kv, dtype="fp32"))


# ---- rejected payloads -------------------------------------------------------------------------
def test_corrupted_body_byte_fails_the_checksum():
    payload = bytearray(encode_cache(make_cache(), dtype="fp32"))
    payload[-100] ^= 0x01
    with pytest.raises(CodecError, match="xxh3 checksum of its body does not match"):
        decode_cache(bytes(payload))


def test_corrupted_header_byte_fails_the_crc():
    payload = bytearray(encode_cache(make_cache(), dtype="fp32"))
    payload[PREFIX.size + 20] ^= 0x20
    with pytest.raises(CodecError, match="header is corrupted"):
        decode_cache(bytes(payload))


def test_truncated_and_padded_payloads_are_rejected():
    payload = encode_cache(make_cache(), dtype="bf16")
    with pytest.raises(CodecError, match=f"truncated: header says {len(payload)} bytes, got {len(payload) - 10}"):
        decode_cache(payload[:-10])
    with pytest.raises(CodecError, match="truncated"):
        decode_cache(payload[:12])
    with pytest.raises(CodecError, match="trailing"):
        decode_cache(bytes(payload) + b"\0")


def test_oversized_payload_is_rejected_before_parsing():
    payload = encode_cache(make_cache(), dtype="bf16")
    with pytest.raises(CodecError, match=f"{len(payload)} bytes, over the limit of 1000"):
        decode_cache(payload, max_bytes=1000)
    # garbage over the limit is rejected for its size, before its magic is even looked at
    with pytest.raises(CodecError, match="over the limit"):
        decode_cache(b"x" * 2000, max_bytes=1000)
    # a prefix that claims a huge body is rejected from the prefix alone
    fields, header, body = split(payload)
    raw = payload[PREFIX.size:PREFIX.size + fields[3]]
    huge = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(raw), 1 << 40, zlib.crc32(raw), 0) + raw + body
    with pytest.raises(CodecError, match="over the limit"):
        decode_cache(huge)


def test_wrong_magic_and_version_are_rejected():
    payload = encode_cache(make_cache(), dtype="bf16")
    with pytest.raises(CodecError, match="not an agentmesh cache payload"):
        decode_cache(b"PK\x03\x04" + payload[4:])
    fields, header, body = split(payload)
    with pytest.raises(CodecError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        decode_cache(rebuild((fields[0], FORMAT_VERSION + 1, *fields[2:]), header, body))
    header["version"] = FORMAT_VERSION + 1
    with pytest.raises(CodecError, match="'version' is invalid"):
        decode_cache(rebuild(fields, header, body))


def test_header_lying_about_shapes_is_caught_before_tensors_are_built():
    payload = encode_cache(make_cache(), dtype="bf16")
    fields, header, body = split(payload)
    header["layers"][1]["tokens"] = 6
    with pytest.raises(CodecError, match=r"tensor 'k\.1' has shape \[2, 2, 7, 8\]; the header says \[2, 2, 6, 8\]"):
        decode_cache(rebuild(fields, header, body))
    _, header, _ = split(payload)
    header["layers"][0]["heads"] = 4096  # would need far more bytes than the body holds
    with pytest.raises(CodecError, match="has shape"):
        decode_cache(rebuild(fields, header, body))
    _, header, _ = split(payload)
    header["wire_dtype"], header["quant"] = "fp16", {"scheme": "none"}
    with pytest.raises(CodecError, match="is BF16; the header says F16"):
        decode_cache(rebuild(fields, header, body))
    _, header, _ = split(payload)
    header["layer_ids"] = [0, 1, 2, 2]
    with pytest.raises(CodecError, match="repeats a layer id"):
        decode_cache(rebuild(fields, header, body))
    _, header, _ = split(payload)
    header["layers"][0]["tokens"] = "7"  # strict schema: no coercion
    with pytest.raises(CodecError, match="layers.0.tokens"):
        decode_cache(rebuild(fields, header, body))
    _, header, _ = split(payload)
    header["extra"] = 1
    with pytest.raises(CodecError, match="'extra' is invalid"):
        decode_cache(rebuild(fields, header, body))


def test_safetensors_entries_must_tile_the_body_exactly():
    payload = encode_cache(make_cache(meta=False), dtype="fp32")
    fields, header, body = split(payload)
    (n,) = struct.unpack_from("<Q", body, 0)
    table = orjson.loads(body[8:8 + n])
    a, b = table["k.0"]["data_offsets"], table["v.0"]["data_offsets"]
    table["k.0"]["data_offsets"], table["v.0"]["data_offsets"] = b, b  # overlap, leaving a gap
    raw = orjson.dumps(table)
    raw += b" " * (-len(raw) % 8)
    forged = struct.pack("<Q", len(raw)) + raw + body[8 + n:]
    header["body_xxh3"], header["body_bytes"] = xxhash.xxh3_64_hexdigest(forged), len(forged)
    assert a != b
    with pytest.raises(CodecError, match="overlap or leave a gap"):
        decode_cache(rebuild(fields, header, forged))


def test_payload_from_another_model_is_rejected():
    payload = encode_cache(make_cache(), dtype="bf16")
    with pytest.raises(CodecError, match="made by model 'tiny-a'.*expected 'tiny-b'"):
        decode_cache(payload, expected=OTHER)
    narrow = ModelSignature(**{**SIG.to_dict(), "num_kv_heads": 4})
    with pytest.raises(CodecError, match="layer 0 has 2 heads of dim 8"):
        decode_cache(payload, expected=narrow)
    shallow = ModelSignature(**{**SIG.to_dict(), "num_layers": 2})
    with pytest.raises(CodecError, match="layer 2 has"):
        decode_cache(payload, expected=shallow)


def test_a_cache_damaged_on_the_link_never_reaches_the_receiver():
    # A LinkedEndpoint decodes what crossed the link, checked against the signature, before any
    # receiver sees it: a flipped byte is a CodecError, and the sender's own cache is unchanged.
    import asyncio

    from agentmesh.mesh.linked import LinkedEndpoint
    from agentmesh.runtime.endpoint import CallContext, ReadRequest, ShareRequest
    from agentmesh.runtime.trace import Trace
    from agentmesh.transport.link import InProcessLink

    class FlippingLink(InProcessLink):
        async def send(self, channel, payload, **kw):
            data = bytearray(payload)
            data[-1] ^= 0xFF
            return await super().send(channel, bytes(data), **kw)

    class Sharer:  # the parts of an endpoint LinkedEndpoint.share uses
        agent = "sharer"
        cache = make_cache(torch.bfloat16, batch=1, seed=2)

        async def share(self, req, ctx):
            return self.cache

    snapshot = Sharer.cache.clone()
    span = torch.ones(1, 7, dtype=torch.long)
    req = ShareRequest(receiver="receiver", reading=ReadRequest(), span_ids=span, span_mask=span, keep_last=7)

    async def share(link_type):
        async with link_type(default_timeout=10) as link:
            return await LinkedEndpoint(Sharer(), link).share(req, CallContext("sharer", Trace()))

    with pytest.raises(CodecError, match="corrupted"):
        asyncio.run(share(FlippingLink))
    assert_same(Sharer.cache, snapshot)
    arrived = asyncio.run(share(InProcessLink))
    assert arrived is not Sharer.cache
    assert_same(arrived, snapshot)


def test_bad_encode_arguments_are_codec_errors():
    kv = make_cache()
    with pytest.raises(CodecError, match="wire dtype 'int4'"):
        encode_cache(kv, dtype="int4")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="int8_scale 'per_token'"):
        encode_cache(kv, dtype="int8", int8_scale="per_token")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="decode dtype 'int4'"):
        decode_cache(encode_cache(kv), dtype="int4")


# ---- format versions, zero-copy decode, argument types, decoded size --------------------------
def _fixture_cache() -> KVCache:
    """The cache in tests/data/kvcache_v2_fp32.bin, written by the format version 2 encoder."""
    shape, n = (1, 2, 3, 8), 48
    keys = [torch.arange(n, dtype=torch.float32).reshape(shape) / 8 + lid for lid in range(2)]
    values = [-torch.arange(n, dtype=torch.float32).reshape(shape) / 4 - lid for lid in range(2)]
    return KVCache(keys=keys, values=values, signature=SIG, token_ids=torch.tensor([[5, 6, 7]]),
                   positions=torch.tensor([[0, 1, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                   layer_ids=(1, 3))


def test_version_2_payloads_with_crc32_stay_readable():
    old = (Path(__file__).parent / "data" / "kvcache_v2_fp32.bin").read_bytes()
    assert PREFIX.unpack_from(old, 0)[1] == 2 and "body_crc32" in split(old)[1]
    assert_same(decode_cache(old, expected=SIG), _fixture_cache())
    corrupted = bytearray(old)
    corrupted[-1] ^= 0x01
    with pytest.raises(CodecError, match="CRC-32 of its body does not match"):
        decode_cache(corrupted)
    # each version carries its own checksum, and only that one
    fields, header, body = split(encode_cache(make_cache()))
    header["body_crc32"] = zlib.crc32(body)
    with pytest.raises(CodecError, match="version 3 must carry body_xxh3 and not body_crc32"):
        decode_cache(rebuild(fields, header, body))


def test_decode_views_a_writable_payload_and_copies_immutable_bytes():
    kv = make_cache(torch.bfloat16)
    payload = encode_cache(kv, dtype="bf16")
    assert isinstance(payload, memoryview) and not payload.readonly
    out = decode_cache(payload, expected=SIG)
    assert_same(kv, out)
    for t in (*out.keys, *out.values, out.token_ids, out.positions, out.attention_mask):
        assert inside(t, payload)
    # a payload inside a larger receive buffer (an envelope), even at an odd offset
    for pad in (8, 3):
        envelope = bytearray(pad) + bytes(payload) + bytearray(5)
        inner = memoryview(envelope)[pad:pad + len(payload)]
        out = decode_cache(inner, expected=SIG)
        assert_same(kv, out)
        assert inside(out.keys[0], envelope) == (pad % 2 == 0)
    frozen = decode_cache(bytes(payload), expected=SIG)
    assert_same(kv, frozen)
    assert not inside(frozen.keys[0], payload)
    # a conversion to another dtype owns its result
    widened = decode_cache(payload, dtype=torch.float32)
    assert not inside(widened.keys[0], payload)


def test_non_bytes_arguments_raise_codec_errors():
    payload = encode_cache(make_cache())
    for bad in ("a string", 123, None, [1, 2, 3], make_cache()):
        with pytest.raises(CodecError, match="needs the payload as bytes"):
            decode_cache(bad)  # type: ignore[arg-type]
        with pytest.raises(CodecError, match="needs the payload as bytes"):
            read_header(bad)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="encode_cache needs a KVCache, got memoryview"):
        encode_cache(payload)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="expected must be a ModelSignature, got str"):
        decode_cache(payload, expected="tiny-a")  # type: ignore[arg-type]
    for limit in ("1000", 0, 1.5):
        with pytest.raises(CodecError, match="max_bytes must be a positive int"):
            decode_cache(payload, max_bytes=limit)  # type: ignore[arg-type]


def test_decoded_size_is_bounded_before_anything_is_allocated():
    kv = make_cache(torch.float32, tokens=64, meta=False)
    payload = encode_cache(kv, dtype="int8")  # decodes to about 4x its size
    with pytest.raises(CodecError, match=rf"decodes to {kv.nbytes} bytes of float32, over the limit"):
        decode_cache(payload, max_bytes=len(payload) + 1)
    assert decode_cache(payload, max_bytes=kv.nbytes + 1).nbytes == kv.nbytes
    # a header claiming a wider source dtype makes the decode wider still, and is held to the limit
    fields, header, body = split(payload)
    header["source_dtype"] = "float64"
    with pytest.raises(CodecError, match=rf"decodes to {2 * kv.nbytes} bytes of float64"):
        decode_cache(rebuild(fields, header, body), max_bytes=kv.nbytes + 1)


def test_header_claiming_a_wider_wire_dtype_than_the_body_holds_is_rejected():
    payload = encode_cache(make_cache(meta=False), dtype="bf16")
    fields, header, body = split(payload)
    # a consistent forgery: the header and the safetensors table both claim fp32 for bf16 bytes
    (n,) = struct.unpack_from("<Q", body, 0)
    table = orjson.loads(body[8:8 + n])
    for info in table.values():
        info["dtype"] = "F32"
    raw = orjson.dumps(table)
    raw += b" " * (-len(raw) % 8)
    forged = struct.pack("<Q", len(raw)) + raw + body[8 + n:]
    header["wire_dtype"] = "fp32"
    header["body_xxh3"], header["body_bytes"] = xxhash.xxh3_64_hexdigest(forged), len(forged)
    with pytest.raises(CodecError, match=r"tensor 'k\.\d' has data offsets \[\d+, \d+\]; expected \d+ bytes"):
        decode_cache(rebuild(fields, header, forged))


@pytest.mark.parametrize("wire", ["bf16", "int8"])
def test_layers_of_different_lengths_take_the_tensor_by_tensor_path(wire: str) -> None:
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, 2, n, 8, generator=g) for n in (7, 4, 7)]  # a sliding-window layer holds fewer
    values = [torch.randn(1, 2, n, 8, generator=g) for n in (7, 4, 7)]
    kv = KVCache(keys=keys, values=values, signature=SIG, layer_ids=(0, 1, 2))
    out = decode_cache(encode_cache(kv, dtype=wire), expected=SIG)
    assert [k.shape[2] for k in out.keys] == [7, 4, 7]
    for x, y in zip((*kv.keys, *kv.values), (*out.keys, *out.values)):
        bound = 2 ** -8 * x.abs() if wire == "bf16" else _group_scale(x, "per_head", 127.0) / 2 * (1 + 1e-5)
        assert bool(((x - y).abs() <= bound + 1e-7).all())
