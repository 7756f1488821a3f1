"""Cross-tokenizer alignment on two genuinely different real tokenizers.

Receiver/sharer: SmolLM2's byte-level BPE (49k vocab, ChatML template, untrimmed offsets that
include the leading space) and a byte-level BPE trained here (~400 tokens, its own special tokens,
a template that trims contents and puts a default system turn first, trimmed offsets). Every
property is checked against a brute-force oracle computed from the rendered texts.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from agentmesh.c2c.alignment import (
    AlignedBatch, TokenAlignment, align, align_batch, batch_alignments, locate_contents,
    reference_map, render_conversation, same_vocabulary,
)
from agentmesh.errors import ConfigError

SHARER_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}[INST]system: Be brief.[/INST]\n{% endif %}"
    "{% for m in messages %}[INST]{{ m['role'] }}: {{ m['content'] | trim }}[/INST]\n{% endfor %}"
    "{% if add_generation_prompt %}[INST]assistant:{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire.",
    "Hello world, this is a small test of byte level tokenizers and their offsets.",
    "Cache to cache fusion lets one model read the keys and values of another model.",
    "What is the capital of France? Paris is the capital and the largest city.",
    "Numbers like 12, 345 and 6789 appear in questions about arithmetic and algebra.",
    "A receiver decodes after the sharer prefills the same prompt with its own template.",
    "Please answer briefly, explain your reasoning, and give one clear sentence.",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "  And at night?\n"}],
    [{"role": "user", "content": "Café crème, naïve façade — 你好世界 😀👍🏽 ok?"}],
    [{"role": "user", "content": "Indented:\n    x = 1\n\ty = 2\n\nDone!"}],
]


# ---- tokenizers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        return request.getfixturevalue("smol_tokenizer")  # the shared conftest fixture, if present
    except pytest.FixtureLookupError:
        from agentmesh.models.tiny import smollm2_tokenizer
        return smollm2_tokenizer(tmp_path_factory.mktemp("smol-tokenizer"))


def _train_bpe(vocab_size: int = 400, *, merges_from: list[str] = CORPUS) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)  # the other offset convention
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=["<pad>", "<s>", "</s>", "[INST]", "[/INST]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(merges_from * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  extra_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = SHARER_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bpe() -> Any:
    return _train_bpe()


def _hand_bpe() -> Any:
    """A byte-level BPE with hand-written merges, so re-encodings are known in advance."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "h"), ("l", "p"), ("lp", "f"), ("lpf", "u"), ("lpfu", "l")]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for piece in alphabet + ["".join(m) for m in merges]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ---- the oracle -----------------------------------------------------------------------------------
def _spans_by_search(text: str, contents: list[str]) -> list[tuple[int, int, int]]:
    """(start, end, origin) of each content, searched in order, as is or trimmed."""
    out, pos = [], 0
    for c in contents:
        for variant, origin in ((c, 0), (c.strip(), len(c) - len(c.lstrip()))):
            at = text.find(variant, pos)
            if at >= 0:
                out.append((at, at + len(variant), origin))
                pos = at + len(variant)
                break
        else:
            raise AssertionError(f"oracle could not find {c!r} in {text!r}")
    return out


def _stripped(text: str, a: int, b: int) -> tuple[int, int]:
    piece = text[a:b]
    lo = a + len(piece) - len(piece.lstrip())
    return lo, lo + len(piece.strip())


def check_alignment(al: TokenAlignment, r_tok: Any, s_tok: Any, contents: list[str]) -> int:
    """Assert every alignment property against a brute-force oracle; returns the fused count."""
    r_spans = _spans_by_search(al.receiver_text, contents)
    s_spans = _spans_by_search(al.sharer_text, contents)
    r_special = set(r_tok.all_special_ids)
    s_special = set(s_tok.all_special_ids)
    assert len(al.fuse_mask) == len(al.receiver_ids) == len(al.sharer_spans)
    assert al.receiver_ids == r_tok(al.receiver_text, add_special_tokens=False)["input_ids"]
    assert al.sharer_ids == s_tok(al.sharer_text, add_special_tokens=False)["input_ids"]

    def sharer_coords(m: int, j: int) -> tuple[int, int]:
        a, b = al.sharer_offsets[j]
        cs, ce, origin = s_spans[m]
        lo, hi = max(a, cs), min(b, ce)
        return (lo - cs + origin, hi - cs + origin) if hi > lo and al.sharer_ids[j] not in s_special else (0, 0)

    last, first, longest = al.gather_index("last"), al.gather_index("first"), al.gather_index("longest")
    fused = 0
    for i, (a, b) in enumerate(al.receiver_offsets):
        lo, hi = _stripped(al.receiver_text, a, b)
        inside = [m for m, (cs, ce, _) in enumerate(r_spans)
                  if b > a and (cs <= lo and hi <= ce if hi > lo else cs <= a and b <= ce)]
        if al.receiver_ids[i] in r_special or not inside:
            assert not al.fuse_mask[i], f"template/special token {i} {al.receiver_text[a:b]!r} is fused"
            assert al.sharer_spans[i] == (0, 0) and last[i] == first[i] == longest[i] == -1
            continue
        m = inside[0]
        cs, ce, origin = r_spans[m]
        ra, rb = max(a, cs) - cs + origin, min(b, ce) - cs + origin
        overlaps = {}
        for j in range(len(al.sharer_ids)):
            sa, sb = sharer_coords(m, j)
            if sb > sa and sa < rb and ra < sb:
                overlaps[j] = min(rb, sb) - max(ra, sa)
        if not overlaps:
            assert not al.fuse_mask[i] and last[i] == -1
            assert not al.receiver_text[a:b].strip(), f"content token {i} {al.receiver_text[a:b]!r} not covered"
            continue
        fused += 1
        assert al.fuse_mask[i]
        assert al.sharer_spans[i] == (min(overlaps), max(overlaps) + 1)
        assert last[i] == max(overlaps) and first[i] == min(overlaps)
        assert longest[i] == min(j for j, n in overlaps.items() if n == max(overlaps.values()))
        # Character identity: each visible character of the receiver token is a character of a
        # sharer token in its span, read back from the sharer's own rendered text.
        s_cs, _, s_origin = s_spans[m]
        for x in range(ra, rb):
            ch = al.receiver_text[cs + x - origin]
            if ch.isspace():
                continue
            holders = [j for j in range(*al.sharer_spans[i]) if sharer_coords(m, j)[0] <= x < sharer_coords(m, j)[1]]
            assert holders, f"char {ch!r} of receiver token {i} not covered by its sharer span"
            assert al.sharer_text[s_cs + x - s_origin] == ch
    return fused


# ---- tests ---------------------------------------------------------------------------------------
def test_the_two_tokenizers_really_differ(smol: Any, bpe: Any) -> None:
    assert len(bpe) <= 400 < len(smol)
    assert not same_vocabulary(smol, bpe) and not same_vocabulary(smol, bpe, allow_extension=True)
    text = "The capital of France is Paris."
    assert smol.tokenize(text) != bpe.tokenize(text)
    assert "[INST]" in render_conversation(bpe, CONVERSATIONS[0]) and "<|im_start|>" in render_conversation(
        smol, CONVERSATIONS[0])


@pytest.mark.parametrize("direction", ["smol->bpe", "bpe->smol"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_every_fused_token_reads_the_sharer_tokens_covering_its_characters(
        smol: Any, bpe: Any, direction: str, conv: int) -> None:
    r_tok, s_tok = (smol, bpe) if direction == "smol->bpe" else (bpe, smol)
    messages = CONVERSATIONS[conv]
    al = align(r_tok, s_tok, messages)
    assert al.method == "offsets"
    fused = check_alignment(al, r_tok, s_tok, [m["content"] for m in messages])
    # check_alignment already demands that every content token with a visible character is fused.
    assert fused >= sum(len(m["content"].split()) for m in messages)
    # Template and special tokens are never fused.
    for i, tid in enumerate(al.receiver_ids):
        if tid in r_tok.all_special_ids:
            assert not al.fuse_mask[i]
    assert al.sharer_length_needed() <= len(al.sharer_ids)


def test_gather_last_is_the_last_covering_token_and_sees_all_characters(smol: Any, bpe: Any) -> None:
    al = align(smol, bpe, [{"role": "user", "content": "helpfulness unbelievably"}])
    last, spans = al.gather_index("last"), al.sharer_spans
    multi = [i for i, (a, b) in enumerate(spans) if b - a > 1]
    assert multi, "a 49k-vocab token should span several 400-vocab tokens"
    for i in multi:
        a, b = spans[i]
        assert last[i] == b - 1 and al.gather_index("first")[i] == a
        # The last covering sharer token ends at or after the receiver token's last character.
        r_end = al.receiver_offsets[i][1]
        s_end = al.sharer_offsets[last[i]][1]
        r_content = al.receiver_text[:r_end].rsplit("\n", 1)[-1]
        s_content = al.sharer_text[:s_end].rsplit(": ", 1)[-1]
        assert s_content.endswith(r_content.strip()[-1])
    assert al.gather_spans() == spans
    with pytest.raises(ConfigError, match="gather strategy"):
        al.gather_index("mean")


def test_unicode_emoji_accents_cjk(smol: Any, bpe: Any) -> None:
    content = "é😀你好 naïve 👍🏽"
    al = align(smol, bpe, [{"role": "user", "content": content}])
    check_alignment(al, smol, bpe, [content])
    # Byte-level BPE splits the emoji into byte pieces that share one character's offsets:
    # every piece of it on the receiver side reads a sharer token holding that character.
    emoji_at = al.receiver_text.index("😀")
    pieces = [i for i, (a, b) in enumerate(al.receiver_offsets) if a <= emoji_at < b]
    assert len(pieces) >= 2 and all(al.fuse_mask[i] for i in pieces)
    for i in pieces:
        sa, sb = al.sharer_offsets[al.gather_index("last")[i]]
        assert "😀" in al.sharer_text[sa:sb]


def test_content_repeated_in_template_and_in_two_messages(smol: Any, bpe: Any) -> None:
    # "helpful" is also in SmolLM2's default system prompt; "Same text." is sent twice.
    messages = [{"role": "user", "content": "helpful"}, {"role": "assistant", "content": "Same text."},
                {"role": "user", "content": "Same text."}]
    r_text, r_spans = locate_contents(lambda m: render_conversation(smol, m), messages)
    assert r_text.index("helpful") < r_spans[0].start  # not the system prompt's copy
    assert r_text[r_spans[0].start - len("user\n"):r_spans[0].start] == "user\n"
    assert r_spans[1].end <= r_spans[2].start and r_text[r_spans[1].start:r_spans[1].end] == "Same text."
    al = align(smol, bpe, messages)
    fused_chars = [al.receiver_text[a:b] for (a, b), f in zip(al.receiver_offsets, al.fuse_mask) if f]
    assert "".join(fused_chars).replace(" ", "") == "helpfulSametext.Sametext."
    # No token of the default system prompt is fused.
    system_end = al.receiver_text.index("<|im_end|>")
    assert not any(f for (a, _), f in zip(al.receiver_offsets, al.fuse_mask) if a < system_end)


def test_empty_message_and_trimmed_content(smol: Any, bpe: Any) -> None:
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "  spaced out  "},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "next"}]
    for r_tok, s_tok in ((smol, bpe), (bpe, smol)):
        al = align(r_tok, s_tok, messages)
        check_alignment(al, r_tok, s_tok, [m["content"] for m in messages])
        fused = "".join(al.receiver_text[a:b] for (a, b), f in zip(al.receiver_offsets, al.fuse_mask) if f)
        assert "".join(fused.split()) == "spacedoutnext"


def test_plain_format_for_a_tokenizer_without_chat_template(smol: Any) -> None:
    plain = _train_bpe()
    plain.chat_template = None
    messages = [{"role": "user", "content": "hello world"}]
    assert render_conversation(plain, messages) == "user: hello world\nassistant:"
    al = align(smol, plain, messages)
    check_alignment(al, smol, plain, ["hello world"])
    # The other way round SmolLM2's "Ġhello" glues the template's space to the word: still fused.
    al = align(plain, smol, messages)
    assert check_alignment(al, plain, smol, ["hello world"]) >= 2


def test_plain_text_input(smol: Any, bpe: Any) -> None:
    text = "Plain text, no template: 3 + 4 = 7."
    al = align(smol, bpe, text)
    assert al.receiver_text == al.sharer_text == text
    visible = [t for t in smol.tokenize(text) if t.strip("Ġ")]  # lone spaces: nothing of the sharer's covers them
    assert check_alignment(al, smol, bpe, [text]) == len(visible)


def test_reference_map_first_and_longest_hand_checked(smol: Any) -> None:
    hand = _hand_bpe()
    tid = smol.convert_tokens_to_ids("Ġhelpful")
    assert hand.convert_ids_to_tokens(hand.encode(" helpful", add_special_tokens=False)) == ["Ġh", "e", "lpful"]
    h, lpful = hand.convert_tokens_to_ids("Ġh"), hand.convert_tokens_to_ids("lpful")
    assert reference_map(smol, hand, [tid], "first") == [h]
    assert reference_map(smol, hand, [tid], "longest") == [lpful]  # " h" (2), "e" (1), "lpful" (5)
    # One piece: that piece, either way.
    e_id = smol.convert_tokens_to_ids("e")
    assert reference_map(smol, hand, [e_id], "first") == reference_map(smol, hand, [e_id], "longest") == [
        hand.convert_tokens_to_ids("e")]
    # Special tokens map by role: SmolLM2's eos (<|im_end|>) and bos (<|im_start|>) to the sharer's;
    # its unk (<|endoftext|>) has no counterpart and no same-text token: 0.
    assert reference_map(smol, hand, [smol.eos_token_id, smol.bos_token_id, smol.unk_token_id]) == [2, 1, 0]
    # Equal lengths: the first of the longest.
    ties = smol.convert_tokens_to_ids("Ġhe")
    assert hand.convert_ids_to_tokens(hand.encode(" he", add_special_tokens=False)) == ["Ġh", "e"]
    assert reference_map(smol, hand, [ties], "longest") == [h]
    with pytest.raises(ConfigError, match="'first' or 'longest'"):
        reference_map(smol, hand, [tid], "last")


def test_reference_layout_runs_published_strategies(smol: Any, bpe: Any) -> None:
    messages = CONVERSATIONS[1]
    for strategy in ("first", "longest"):
        al = align(smol, bpe, messages, method=strategy)
        assert al.method == strategy
        own = bpe(al.sharer_text, add_special_tokens=False)["input_ids"]
        # The sharer keeps its own template tokens (all of its special tokens are there) ...
        assert [t for t in al.sharer_ids if t in bpe.all_special_ids] == [t for t in own if t in bpe.all_special_ids]
        # ... and each fused receiver token reads the one position holding its reference mapping.
        idx = al.gather_index()
        fused = [i for i, f in enumerate(al.fuse_mask) if f]
        assert fused and all(al.sharer_spans[i] == (idx[i], idx[i] + 1) for i in fused)
        mapped = reference_map(smol, bpe, [al.receiver_ids[i] for i in fused], strategy)
        assert [al.sharer_ids[idx[i]] for i in fused] == mapped
        assert all(al.sharer_offsets[idx[i]] is None for i in fused)
        assert idx == al.gather_index("first") == al.gather_index("longest")
    with pytest.raises(ConfigError, match="share_ids"):
        align(smol, bpe, messages, method="first", share_ids=True)


def test_identical_tokenizers_give_the_identity(smol: Any, tmp_path: Any) -> None:
    from transformers import AutoTokenizer

    smol.save_pretrained(tmp_path)
    copy = AutoTokenizer.from_pretrained(tmp_path)
    assert copy is not smol and same_vocabulary(smol, copy)
    al = align(smol, copy, CONVERSATIONS[1])
    assert al.method == "identity" and al.sharer_ids == al.receiver_ids
    assert all(al.fuse_mask) and al.gather_index() == list(range(len(al.receiver_ids)))
    assert al.receiver_text == smol.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert al.receiver_ids == smol(al.receiver_text, add_special_tokens=False)["input_ids"]
    # One extra added token: not identical, but an extension with the same meaning for shared ids.
    copy.add_tokens(["<think>"], special_tokens=True)
    assert not same_vocabulary(smol, copy) and same_vocabulary(smol, copy, allow_extension=True)
    assert align(smol, copy, CONVERSATIONS[0]).method == "offsets"


def test_batch_pads_and_shifts_gather_indices(smol: Any, bpe: Any) -> None:
    convs = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[2]]
    n_max = max(len(align(smol, bpe, c).receiver_ids) for c in convs)
    batch = align_batch(smol, bpe, convs, strategy="last", span=n_max - 1)
    assert isinstance(batch, AlignedBatch)
    assert batch.gather_index.shape == (3, n_max - 1) and batch.receiver_ids.shape == (3, n_max)
    for b, al in enumerate(batch.alignments):
        r_shift = n_max - len(al.receiver_ids)
        s_shift = batch.input_ids.shape[1] - len(al.sharer_ids)
        assert batch.receiver_ids[b, r_shift:].tolist() == al.receiver_ids
        assert batch.attention_mask[b].sum().item() == len(al.sharer_ids)
        assert batch.receiver_attention_mask[b, :r_shift].sum().item() == 0
        gather = al.gather_index("last")
        for p in range(n_max - 1):
            i = p - r_shift
            g = int(batch.gather_index[b, p])
            if i < 0 or gather[i] < 0:
                assert g == -1 and not batch.fuse_mask[b, p]
            else:
                assert g == gather[i] + s_shift
                assert int(batch.input_ids[b, g]) == al.sharer_ids[gather[i]]
                lo, hi = batch.gather_spans[b, p].tolist()
                assert (lo - s_shift, hi - s_shift) == al.sharer_spans[i]
    # The published strategies batch in the reference layout.
    ref = align_batch(smol, bpe, convs, strategy="longest")
    assert all(a.method == "longest" for a in ref.alignments) and ref.gather_index.shape == (3, n_max)
    right = batch_alignments(list(batch.alignments), receiver_pad_id=0, sharer_pad_id=0, padding_side="right")
    assert torch.equal(right.gather_index[0, :len(batch.alignments[0])],
                       torch.tensor(batch.alignments[0].gather_index()))


def test_bad_inputs_give_clear_errors(smol: Any, bpe: Any) -> None:
    with pytest.raises(ConfigError, match="method"):
        align(smol, bpe, "x", method="nearest")
    with pytest.raises(ConfigError, match="message 0"):
        align(smol, bpe, [{"content": "no role"}])
    with pytest.raises(ConfigError, match="plain string content"):
        align(smol, bpe, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    with pytest.raises(ConfigError, match="no alignments"):
        batch_alignments([], receiver_pad_id=0, sharer_pad_id=0)


def test_end_to_end_generation_with_a_different_tokenizer_sharer(
        smol: Any, bpe: Any, tiny_model_factory: Any) -> None:
    from agentmesh.c2c import C2CModel, Fuser
    from agentmesh.models.inference import prefill

    receiver = tiny_model_factory("qwen3", smol, num_layers=2)
    sharer = tiny_model_factory("llama", bpe, num_layers=3)
    fuser = Fuser.build(receiver.signature, sharer.signature, hidden_dim=32, intermediate_dim=32, dropout=0.0)
    with torch.no_grad():
        for name, p in fuser.named_parameters():
            if name.endswith("gate_logit"):
                p.fill_(1.0)  # open every gate so that fusion visibly changes the cache
    c2c = C2CModel(receiver, [sharer], [fuser])
    messages = [{"role": "user", "content": "Café 😀: what is 3 + 4?"}]
    ids, mask, sharer_inputs = c2c.encode_chat([messages])
    assert sharer_inputs is not None and sharer_inputs[0] is not None
    fused = c2c.prefill_fused(ids, mask, sharer_inputs)
    plain = prefill(receiver, ids[:, :-1], mask[:, :-1])
    gather = sharer_inputs[0].gather_index[0]                                  # (N - 1,)
    k_fused, k_plain = fused.layer(fused.layer_ids[-1])[0], plain.layer(plain.layer_ids[-1])[0]  # (1, H, N-1, D)
    changed = (k_fused - k_plain).abs().amax(dim=(0, 1, 3)) > 0                # (N - 1,)
    assert changed.tolist() == (gather >= 0).tolist()  # content fused, template kept as the receiver's
    assert int((gather >= 0).sum()) >= 5
    out = c2c.generate(ids, mask, sharer_inputs=sharer_inputs, max_new_tokens=3)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 3


def test_locating_falls_back_to_ordered_search_and_tolerates_unfound_content(smol: Any, bpe: Any) -> None:
    # A renderer that drops any content it does not like (here: our private-use placeholders)
    # defeats the placeholder pass; the ordered search still finds each content after the last.
    def render(msgs: Any) -> str:
        return "".join(f"<{m['role']}>{'' if chr(0xE000) in m['content'] else m['content']}|" for m in msgs)

    messages = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ab"},
                {"role": "user", "content": "zz"}]
    text, spans = locate_contents(render, messages)
    assert text == "<user>ab|<assistant>ab|<user>zz|"
    assert [(s.start, s.end) for s in spans] == [(6, 8), (20, 22), (29, 31)]
    # A template that transforms content beyond trimming: that message is simply not fused.
    shouting = _train_bpe()
    shouting.chat_template = "{% for m in messages %}[INST]{{ m['content'] | upper }}[/INST]{% endfor %}"
    al = align(smol, shouting, [{"role": "user", "content": "quiet words"}, {"role": "user", "content": "MORE"}])
    fused = "".join(al.receiver_text[a:b] for (a, b), f in zip(al.receiver_offsets, al.fuse_mask) if f)
    assert fused == "MORE"
