"""Cross-tokenizer alignment: a sharer with its own tokenizer reads the same text as the receiver.

Each model gets the conversation rendered with its own chat template and tokenized its own way.
Every receiver token that lies inside a message's content is paired with the sharer tokens that
cover the same characters of that same content (offset mappings), so no text is re-encoded token
by token. Template and special tokens are never fused: the receiver keeps its own K/V there.

Rules (all in characters, i.e. Python code points, the unit of `return_offsets_mapping`):

* **Content token** (may be fused): a non-special token whose characters, ignoring leading and
  trailing whitespace, all lie inside one message's content span. Whitespace is ignored at the
  edges because byte-level BPE glues the separating space or newline of the template onto the
  neighbouring word ("Ġhello"); a token made only of whitespace must lie entirely inside.
* **Coverage**: a sharer token covers a receiver token when their character ranges, each clipped
  to its own rendering of the message content and measured in the coordinates of the original
  content string, overlap by at least one character (half-open ranges). Clipping makes a
  "Ġword" whose space belongs to the template count only by its content characters; measuring
  in the original content's coordinates makes a template that trims the content (Llama 3) and one
  that does not (ChatML) still agree on which characters are which.
* **Gather** ("last", the default): the last covering sharer token. Under causal attention it is
  the one whose K/V has seen every character of the receiver token. "first" and "longest" (the
  covering token with the largest character overlap, first on ties) mimic the reference's names;
  the reference's own lossy 1-to-1 re-encoding is `reference_map`, and `align(method="first"|
  "longest")` builds the sharer input the way the published fusers were trained on.

Positions that are not fused, or that no sharer token covers, get gather index -1.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from agentmesh.errors import ConfigError
from agentmesh.models.loaded_model import pad_token_id, plain_chat_text
from agentmesh.types import Messages

GatherStrategy = Literal["last", "first", "longest"]
ReferenceStrategy = Literal["first", "longest"]
AlignMethod = Literal["offsets", "first", "longest"]

GATHER_STRATEGIES: tuple[str, ...] = ("last", "first", "longest")
_EMPTY = (0, 0)
# Private-use code points around digits: no template writes them, and trimming, escaping or
# changing case leaves them as they are.
_PLACEHOLDER = "\ue000{}\ue001"


def _is_model(obj: Any) -> bool:
    """A `LoadedModel` (or look-alike): it renders its own chat text."""
    return hasattr(obj, "chat_text") and hasattr(obj, "tokenizer")


def _tokenizer_of(obj: Any) -> Any:
    tok = obj.tokenizer if _is_model(obj) else obj
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"tokenizer {type(tok).__name__} is not a fast tokenizer; alignment needs "
            "return_offsets_mapping, load it with use_fast=True (a tokenizers-backed tokenizer)")
    return tok


def render_conversation(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = True,
                        template_kwargs: Mapping[str, Any] | None = None) -> str:
    """`messages` rendered with the tokenizer's own chat template, or `plain_chat_text` without one.

    Without explicit `template_kwargs`, templates that know `enable_thinking` (Qwen3) get it off,
    as the published fusers were trained and as `LoadedModel.chat_text` does.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return plain_chat_text(messages, add_generation_prompt=add_generation_prompt)
    if template_kwargs is None:
        template_kwargs = {"enable_thinking": False} if "enable_thinking" in str(template) else {}
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)


def _renderer(obj: Any, add_generation_prompt: bool,
              template_kwargs: Mapping[str, Any] | None) -> Callable[[Messages], str]:
    if _is_model(obj) and template_kwargs is None:
        return lambda msgs: obj.chat_text(list(msgs), add_generation_prompt=add_generation_prompt)
    tok = _tokenizer_of(obj)
    return lambda msgs: render_conversation(tok, msgs, add_generation_prompt=add_generation_prompt,
                                            template_kwargs=template_kwargs)


def _check_messages(conversation: Messages) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ConfigError(f"conversation message {i} is {m!r}; expected a dict with 'role' and 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ConfigError(f"conversation message {i} has content of type {type(content).__name__}; "
                              "alignment needs plain string content")
        out.append(dict(m))
    return out


@dataclass(frozen=True)
class ContentSpan:
    """Where one message's content sits in a rendered text.

    `[start, end)` are character indices in the rendering; `origin` is the index in the original
    content string of the rendered character `start` (non-zero when the template trimmed it).
    """

    start: int
    end: int
    origin: int


def _variants(content: str) -> list[tuple[str, int]]:
    """The content as templates may write it (as is, or trimmed), with its origin offset."""
    left = len(content) - len(content.lstrip())
    out: list[tuple[str, int]] = []
    for text, origin in ((content, 0), (content.strip(), left), (content.rstrip(), 0), (content.lstrip(), left)):
        if (text, origin) not in out:
            out.append((text, origin))
    return out


def _locate_by_placeholders(render: Callable[[Messages], str], messages: list[dict[str, Any]],
                            text: str) -> list[ContentSpan | None] | None:
    """Spans found by rendering placeholders in place of the contents; None when that fails.

    The template text between placeholders is what must surround each content in the real
    rendering, so a content repeated elsewhere (in a default system prompt, in another message)
    cannot be mistaken for the message itself.
    """
    contents = [m.get("content") for m in messages]
    marks = [_PLACEHOLDER.format(i) for i in range(len(messages))]
    try:
        skeleton = render([{**m, "content": marks[i]} if contents[i] is not None else m
                           for i, m in enumerate(messages)])
    except Exception:  # noqa: BLE001 - a template may reject our placeholders; fall back to searching
        return None
    found: list[tuple[int, int]] = []  # (message index, position in skeleton)
    for i, mark in enumerate(marks):
        count = skeleton.count(mark)
        if count > 1:
            return None
        if count == 1 and contents[i] is not None:
            found.append((i, skeleton.index(mark)))
    if any(b[1] <= a[1] for a, b in zip(found, found[1:])):
        return None
    literals, cursor = [], 0
    for i, at in found:
        literals.append(skeleton[cursor:at])
        cursor = at + len(marks[i])
    literals.append(skeleton[cursor:])

    spans: list[ContentSpan | None] = [None] * len(messages)
    if not text.startswith(literals[0]):
        return None
    pos = len(literals[0])
    for k, (i, _) in enumerate(found):
        after, is_last = literals[k + 1], k + 1 == len(found)
        for variant, origin in _variants(contents[i]):
            end = pos + len(variant)
            if text.startswith(variant, pos) and text.startswith(after, end) and (
                    not is_last or end + len(after) == len(text)):
                spans[i] = ContentSpan(pos, end, origin)
                pos = end + len(after)
                break
        else:
            return None
    return spans if pos == len(text) else None


def _locate_by_search(messages: list[dict[str, Any]], text: str) -> list[ContentSpan | None]:
    """Spans found by searching each content in order after the previous one (the fallback)."""
    spans: list[ContentSpan | None] = []
    pos = 0
    for m in messages:
        content = m.get("content")
        if content is None:
            spans.append(None)
            continue
        best: tuple[int, int, str, int] | None = None  # (index, -length, variant, origin)
        for variant, origin in _variants(content):
            at = text.find(variant, pos)
            if at >= 0 and (best is None or (at, -len(variant)) < best[:2]):
                best = (at, -len(variant), variant, origin)
        if best is None:
            spans.append(None)
            continue
        at, _, variant, origin = best
        spans.append(ContentSpan(at, at + len(variant), origin))
        pos = at + len(variant)
    return spans


def locate_contents(render: Callable[[Messages], str], messages: Messages,
                    text: str | None = None) -> tuple[str, list[ContentSpan | None]]:
    """The rendering of `messages` and, per message, where its content sits in it (None: not found)."""
    msgs = _check_messages(messages)
    text = render(msgs) if text is None else text
    spans = _locate_by_placeholders(render, msgs, text)
    return text, spans if spans is not None else _locate_by_search(msgs, text)


@dataclass(frozen=True)
class _Tokenized:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    spans: list[ContentSpan | None]
    message_of: list[int]           # per token: message whose content it belongs to, -1 for template
    clipped: list[tuple[int, int]]  # per token: its characters inside that content, original coordinates


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids | {int(i) for i in tokenizer.all_special_ids}


def _content_token(text: str, start: int, end: int, span: ContentSpan) -> bool:
    if end <= start:
        return False
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return span.start <= start and end <= span.end
    lo = start + (len(piece) - len(piece.lstrip()))
    return span.start <= lo and lo + len(stripped) <= span.end


def _tokenize(tokenizer: Any, text: str, spans: list[ContentSpan | None], *,
              add_special_tokens: bool = False) -> _Tokenized:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    specials = _special_ids(tokenizer)
    special = [i in specials for i in ids]
    located = sorted((s.start, s.end, m) for m, s in enumerate(spans) if s is not None)
    starts = [a for a, _, _ in located]
    message_of, clipped = [], []
    for (a, b), is_special in zip(offsets, special):
        owner, rng = -1, _EMPTY
        if not is_special and b > a:
            # The content span a token belongs to is the last one starting at or before its end.
            k = bisect.bisect_left(starts, b) - 1
            while k >= 0:
                s = spans[located[k][2]]
                assert s is not None
                if s.end <= a and s.end > s.start:
                    break
                if _content_token(text, a, b, s):
                    owner = located[k][2]
                    rng = (max(a, s.start) - s.start + s.origin, min(b, s.end) - s.start + s.origin)
                    break
                k -= 1
        message_of.append(owner)
        clipped.append(rng)
    return _Tokenized(text, ids, offsets, special, spans, message_of, clipped)


def _coverage_ranges(tok: _Tokenized) -> list[tuple[int, int]]:
    """Per token, the original-content characters it covers: like `clipped`, but any overlap counts.

    A sharer token may straddle template and content ("Ġword" after a template space, ".\\n"
    before one); its content characters still cover receiver characters.
    """
    out = []
    for t, ((a, b), is_special) in enumerate(zip(tok.offsets, tok.special)):
        if tok.message_of[t] >= 0:
            out.append(tok.clipped[t])
            continue
        rng = _EMPTY
        if not is_special and b > a:
            for s in tok.spans:
                if s is not None and a < s.end and s.start < b:
                    rng = (max(a, s.start) - s.start + s.origin, min(b, s.end) - s.start + s.origin)
                    break
        out.append(rng)
    return out


def _message_of_overlap(tok: _Tokenized, t: int) -> int:
    if tok.message_of[t] >= 0:
        return tok.message_of[t]
    a, b = tok.offsets[t]
    for m, s in enumerate(tok.spans):
        if s is not None and not tok.special[t] and a < s.end and s.start < b:
            return m
    return -1


@dataclass(frozen=True)
class TokenAlignment:
    """One conversation tokenized by a receiver and a sharer, position by position (batch of one).

    `fuse_mask[i]` is True when receiver position i is fused (a content token that some sharer
    token covers). `sharer_spans[i]` is the half-open range of sharer indices that cover it,
    `(0, 0)` (empty) where it is not fused. `longest[i]` is the covering sharer token with the
    largest character overlap (-1 where not fused). The texts and offsets are the two renderings
    and their offset mappings; a sharer offset is None for a token that is not from the sharer's
    own tokenization of `sharer_text` (the reference layout inserts re-encoded receiver tokens).
    """

    receiver_ids: list[int]
    sharer_ids: list[int]
    fuse_mask: list[bool]
    sharer_spans: list[tuple[int, int]]
    longest: list[int]
    method: str = "offsets"
    receiver_text: str = ""
    sharer_text: str = ""
    receiver_offsets: list[tuple[int, int]] = field(default_factory=list)
    sharer_offsets: list[tuple[int, int] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, m = len(self.receiver_ids), len(self.sharer_ids)
        if not (len(self.fuse_mask) == len(self.sharer_spans) == len(self.longest) == n):
            raise ConfigError(f"TokenAlignment has {n} receiver ids but {len(self.fuse_mask)} mask entries, "
                              f"{len(self.sharer_spans)} spans and {len(self.longest)} longest indices")
        for i, ((a, b), fused, best) in enumerate(zip(self.sharer_spans, self.fuse_mask, self.longest)):
            if fused != (b > a) or (fused and not (0 <= a < b <= m and a <= best < b)) or (not fused and best != -1):
                raise ConfigError(f"TokenAlignment position {i}: span {(a, b)}, fused={fused}, longest={best} "
                                  f"are inconsistent for {m} sharer tokens")

    def __len__(self) -> int:
        return len(self.receiver_ids)

    def gather_index(self, strategy: GatherStrategy | str = "last") -> list[int]:
        """Per receiver position, the sharer position to read K/V from (-1: keep the receiver's own)."""
        if strategy == "last":
            return [b - 1 if b > a else -1 for a, b in self.sharer_spans]
        if strategy == "first":
            return [a if b > a else -1 for a, b in self.sharer_spans]
        if strategy == "longest":
            return list(self.longest)
        raise ConfigError(f"gather strategy {strategy!r} is unknown; expected one of {', '.join(GATHER_STRATEGIES)} "
                          "(for averaging use gather_spans())")

    def gather_spans(self) -> list[tuple[int, int]]:
        """Per receiver position, the sharer range `[a, b)` to average over ("mean"); empty if unfused."""
        return list(self.sharer_spans)

    def sharer_length_needed(self) -> int:
        """How many leading sharer tokens the gather reads: the sharer may prefill only these."""
        return max((b for a, b in self.sharer_spans if b > a), default=0)

    @property
    def num_fused(self) -> int:
        return sum(self.fuse_mask)


def same_vocabulary(tok_a: Any, tok_b: Any, *, allow_extension: bool = False) -> bool:
    """Whether the two tokenizers give every token id the same meaning.

    Strict: identical vocabularies and identical special tokens (id and text). With
    `allow_extension`, one may also add tokens the other lacks (Qwen3 adds ``<think>`` and a few
    more on top of Qwen2.5) as long as every shared id means the same token.
    """
    a = tok_a.tokenizer if _is_model(tok_a) else tok_a
    b = tok_b.tokenizer if _is_model(tok_b) else tok_b
    if a is b:
        return True
    va, vb = a.get_vocab(), b.get_vocab()
    sa = {int(i): str(t) for i, t in zip(a.all_special_ids, a.all_special_tokens)}
    sa |= {int(i): str(t.content) for i, t in a.added_tokens_decoder.items() if t.special}
    sb = {int(i): str(t) for i, t in zip(b.all_special_ids, b.all_special_tokens)}
    sb |= {int(i): str(t.content) for i, t in b.added_tokens_decoder.items() if t.special}
    if not allow_extension:
        return va == vb and sa == sb
    (small, s_small), (large, s_large) = sorted(((va, sa), (vb, sb)), key=lambda p: len(p[0]))
    return (all(large.get(tok) == i for tok, i in small.items())
            and all(s_large.get(i) == t for i, t in s_small.items()))


def _identity(receiver: Any, conversation: Messages | str, render: Callable[[Messages], str] | None,
              add_special_tokens: bool) -> TokenAlignment:
    tok = _tokenizer_of(receiver)
    text = conversation if isinstance(conversation, str) else render(_check_messages(conversation))
    enc = tok(text, add_special_tokens=add_special_tokens if isinstance(conversation, str) else False,
              return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    # Same vocabulary: the sharer reads the receiver's very ids and every prompt token is fused
    # (the caller still leaves the last prompt token out, as in the standard C2C layout).
    return TokenAlignment(
        receiver_ids=ids, sharer_ids=list(ids), fuse_mask=[True] * len(ids),
        sharer_spans=[(i, i + 1) for i in range(len(ids))], longest=list(range(len(ids))),
        method="identity", receiver_text=text, sharer_text=text,
        receiver_offsets=offsets, sharer_offsets=list(offsets))


def _offsets_alignment(r: _Tokenized, s: _Tokenized) -> TokenAlignment:
    cover = _coverage_ranges(s)
    # Per message, the sharer tokens with content characters, sorted by start (offsets are monotonic).
    by_message: dict[int, list[tuple[int, int, int]]] = {}
    for t, (a, b) in enumerate(cover):
        m = _message_of_overlap(s, t)
        if m >= 0 and b > a:
            by_message.setdefault(m, []).append((a, b, t))
    mask, spans, longest = [], [], []
    cursor: dict[int, int] = {}
    for t, (a, b) in enumerate(r.clipped):
        m = r.message_of[t]
        pieces = by_message.get(m, []) if m >= 0 and s.spans[m] is not None else []
        k = cursor.get(m, 0)
        while k < len(pieces) and pieces[k][1] <= a:  # sharer tokens that end before this one starts
            k += 1
        cursor[m] = k
        hits = []
        j = k
        while j < len(pieces) and pieces[j][0] < b:
            pa, pb, idx = pieces[j]
            if pa < b and a < pb:
                hits.append((min(b, pb) - max(a, pa), idx))
            j += 1
        if not hits:
            mask.append(False)
            spans.append(_EMPTY)
            longest.append(-1)
            continue
        idxs = [idx for _, idx in hits]
        best = max(hits, key=lambda h: (h[0], -h[1]))[1]
        mask.append(True)
        spans.append((min(idxs), max(idxs) + 1))
        longest.append(best)
    return TokenAlignment(
        receiver_ids=r.ids, sharer_ids=s.ids, fuse_mask=mask, sharer_spans=spans, longest=longest,
        method="offsets", receiver_text=r.text, sharer_text=s.text,
        receiver_offsets=r.offsets, sharer_offsets=list(s.offsets))


def _reference_alignment(r: _Tokenized, s: _Tokenized, receiver_tok: Any, sharer_tok: Any,
                         strategy: str) -> TokenAlignment:
    """The reference's training layout: the sharer's own template tokens, and in each message
    the receiver's content tokens re-encoded one by one (`reference_map`), so that receiver
    content token k reads exactly the sharer position holding its mapped token."""
    n_msgs = len(r.spans)
    r_tokens: list[list[int]] = [[] for _ in range(n_msgs)]
    for t, m in enumerate(r.message_of):
        if m >= 0 and s.spans[m] is not None:
            r_tokens[m].append(t)
    # Where each message's content sits among the sharer's tokens: its own content tokens are replaced.
    s_range: dict[int, tuple[int, int]] = {}
    for m in range(n_msgs):
        if not r_tokens[m]:
            continue
        own = [t for t, mm in enumerate(s.message_of) if mm == m]
        if own:
            s_range[m] = (own[0], own[-1] + 1)
        else:
            span = s.spans[m]
            assert span is not None
            at = next((t for t, (a, _) in enumerate(s.offsets) if a >= span.start and s.offsets[t][1] > a), len(s.ids))
            s_range[m] = (at, at)
    mapped = {m: reference_map(receiver_tok, sharer_tok, [r.ids[t] for t in r_tokens[m]], strategy)
              for m in s_range}
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int] | None] = []
    where: dict[int, int] = {}  # receiver token -> sharer output position

    def keep_own(start: int, stop: int) -> None:
        out_ids.extend(s.ids[start:stop])
        out_offsets.extend(s.offsets[start:stop])

    cursor = 0
    for m in sorted(s_range, key=lambda m: (s_range[m][0], m)):
        start, stop = s_range[m]
        keep_own(cursor, max(start, cursor))
        for rt, sid in zip(r_tokens[m], mapped[m]):
            where[rt] = len(out_ids)
            out_ids.append(sid)
            out_offsets.append(None)
        cursor = max(cursor, stop)
    keep_own(cursor, len(s.ids))
    mask = [i in where for i in range(len(r.ids))]
    spans = [(where[i], where[i] + 1) if i in where else _EMPTY for i in range(len(r.ids))]
    return TokenAlignment(
        receiver_ids=r.ids, sharer_ids=out_ids, fuse_mask=mask, sharer_spans=spans,
        longest=[where.get(i, -1) for i in range(len(r.ids))], method=strategy,
        receiver_text=r.text, sharer_text=s.text, receiver_offsets=r.offsets, sharer_offsets=out_offsets)


def align(receiver: Any, sharer: Any, conversation: Messages | str, *, add_generation_prompt: bool = True,
          method: AlignMethod | str = "offsets", share_ids: bool | None = None,
          template_kwargs: Mapping[str, Any] | None = None, add_special_tokens: bool = False) -> TokenAlignment:
    """Align one conversation (or plain text) between a receiver and a sharer.

    `receiver`/`sharer` are fast tokenizers or `LoadedModel`s (which render with their own
    `chat_text`). A conversation is rendered with each model's own chat template; a plain text
    is one content span for both, tokenized with `add_special_tokens` (whose added tokens are
    never fused).

    `method`: "offsets" (character coverage, the default), or "first"/"longest" (the reference's
    training layout: the sharer's template tokens around the receiver's content tokens
    re-encoded one by one with `reference_map`). `share_ids`: True feeds the sharer the
    receiver's ids (identity mapping, every position fused); None decides with
    `same_vocabulary` for the "offsets" method.
    """
    if method not in ("offsets", "first", "longest"):
        raise ConfigError(f"alignment method {method!r} is unknown; expected 'offsets', 'first' or 'longest'")
    r_tok, s_tok = _tokenizer_of(receiver), _tokenizer_of(sharer)
    if share_ids and method != "offsets":
        raise ConfigError(f"alignment method {method!r} re-encodes receiver tokens for a different vocabulary; "
                          "it cannot be combined with share_ids=True")
    if share_ids is None:
        share_ids = method == "offsets" and same_vocabulary(r_tok, s_tok)
    r_render = _renderer(receiver, add_generation_prompt, template_kwargs)
    if share_ids:
        return _identity(receiver, conversation, r_render, add_special_tokens)

    if isinstance(conversation, str):
        whole = [ContentSpan(0, len(conversation), 0)]
        r = _tokenize(r_tok, conversation, whole, add_special_tokens=add_special_tokens)
        s = _tokenize(s_tok, conversation, whole, add_special_tokens=add_special_tokens)
    else:
        msgs = _check_messages(conversation)
        r_text, r_spans = locate_contents(r_render, msgs)
        s_text, s_spans = locate_contents(_renderer(sharer, add_generation_prompt, template_kwargs), msgs)
        r = _tokenize(r_tok, r_text, r_spans)
        s = _tokenize(s_tok, s_text, s_spans)
    if method == "offsets":
        return _offsets_alignment(r, s)
    return _reference_alignment(r, s, r_tok, s_tok, method)


def _decode_one(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _map_special(receiver_tok: Any, sharer_tok: Any, token_id: int, text: str) -> int:
    def pad(tok: Any) -> int | None:
        # The reference sets a missing pad token to the eos token before mapping.
        return pad_token_id(tok, default=None)

    by_role = {
        pad(receiver_tok): pad(sharer_tok),
        receiver_tok.eos_token_id: sharer_tok.eos_token_id,
        receiver_tok.bos_token_id: sharer_tok.bos_token_id,
        receiver_tok.unk_token_id: sharer_tok.unk_token_id,
    }
    if by_role.get(token_id) is not None:
        return int(by_role[token_id])
    found = sharer_tok.convert_tokens_to_ids(text)
    if isinstance(found, int) and found != sharer_tok.unk_token_id:
        return found
    return int(sharer_tok.unk_token_id or 0)


def reference_map(receiver_tokenizer: Any, sharer_tokenizer: Any, receiver_ids: Sequence[int],
                  strategy: ReferenceStrategy | str = "first") -> list[int]:
    """The reference's lossy 1-to-1 mapping, one sharer id per receiver id, as its fusers were trained.

    Each receiver token is decoded alone (special tokens kept, no clean-up) and re-encoded by the
    sharer without special tokens. One piece: that piece. Several: "first" keeps the first,
    "longest" the one whose own decoding is longest (the first of equals). None: the sharer's
    unk id (or 0). A receiver special token maps by role (pad, eos, bos, unk; a missing pad counts
    as eos), else by its text, else to unk (or 0).
    """
    if strategy not in ("first", "longest"):
        raise ConfigError(f"reference alignment strategy {strategy!r} is unknown; expected 'first' or 'longest'")
    r_tok, s_tok = _tokenizer_of(receiver_tokenizer), _tokenizer_of(sharer_tokenizer)
    specials = set(int(i) for i in r_tok.all_special_ids)
    memo: dict[int, int] = {}
    out = []
    for token_id in (int(i) for i in receiver_ids):
        if token_id not in memo:
            text = _decode_one(r_tok, token_id)
            if token_id in specials:
                memo[token_id] = _map_special(r_tok, s_tok, token_id, text)
            else:
                pieces = list(s_tok.encode(text, add_special_tokens=False))
                if not pieces:
                    memo[token_id] = int(s_tok.unk_token_id or 0)
                elif strategy == "first" or len(pieces) == 1:
                    memo[token_id] = int(pieces[0])
                else:
                    lengths = [len(_decode_one(s_tok, p)) for p in pieces]
                    memo[token_id] = int(pieces[lengths.index(max(lengths))])
        out.append(memo[token_id])
    return out


@dataclass(frozen=True)
class AlignedBatch:
    """Several alignments padded into tensors, ready for a sharer prefill and a K/V gather.

    Sharer side (reads like `C2CModel`'s `SharerInput`): `input_ids`/`attention_mask` (B, M).
    Receiver side: `receiver_ids`/`receiver_attention_mask` (B, N). `gather_index` (B, S) holds,
    for the first S receiver positions (S = `span`, default N), the padded sharer position to
    read (-1: keep the receiver's K/V); `fuse_mask` (B, S) is `gather_index >= 0`;
    `gather_spans` (B, S, 2) the padded sharer ranges for averaging ((-1, -1) where unfused).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor
    fuse_mask: torch.Tensor
    gather_spans: torch.Tensor
    receiver_ids: torch.Tensor
    receiver_attention_mask: torch.Tensor
    alignments: tuple[TokenAlignment, ...]


def _pad_rows(rows: list[list[int]], pad: int, width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)   # (B, W)
    mask = torch.zeros((len(rows), width), dtype=torch.long)      # (B, W)
    shifts = []
    for b, row in enumerate(rows):
        shift = width - len(row) if left else 0
        ids[b, shift:shift + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, shift:shift + len(row)] = 1
        shifts.append(shift)
    return ids, mask, shifts


def batch_alignments(alignments: Sequence[TokenAlignment], *, receiver_pad_id: int, sharer_pad_id: int,
                     strategy: str = "last", span: int | None = None, padding_side: str = "left") -> AlignedBatch:
    """Pad several alignments into one `AlignedBatch`; gather indices shift with the padding."""
    if not alignments:
        raise ConfigError("batch_alignments got no alignments; give at least one")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side {padding_side!r} is unknown; expected 'left' or 'right'")
    left = padding_side == "left"
    n = max(len(a.receiver_ids) for a in alignments)
    m = max(len(a.sharer_ids) for a in alignments)
    span = n if span is None else span
    if not 0 <= span <= n:
        raise ConfigError(f"alignment span {span} is outside the padded receiver length {n}")
    r_ids, r_mask, r_shift = _pad_rows([a.receiver_ids for a in alignments], receiver_pad_id, n, left)
    s_ids, s_mask, s_shift = _pad_rows([a.sharer_ids for a in alignments], sharer_pad_id, m, left)
    gather = torch.full((len(alignments), span), -1, dtype=torch.long)     # (B, S)
    spans = torch.full((len(alignments), span, 2), -1, dtype=torch.long)   # (B, S, 2)
    for b, a in enumerate(alignments):
        for i, (g, (lo, hi)) in enumerate(zip(a.gather_index(strategy), a.sharer_spans)):
            p = i + r_shift[b]
            if p >= span or g < 0:
                continue
            gather[b, p] = g + s_shift[b]
            spans[b, p, 0], spans[b, p, 1] = lo + s_shift[b], hi + s_shift[b]
    return AlignedBatch(input_ids=s_ids, attention_mask=s_mask, gather_index=gather, fuse_mask=gather >= 0,
                        gather_spans=spans, receiver_ids=r_ids, receiver_attention_mask=r_mask,
                        alignments=tuple(alignments))


def align_batch(receiver: Any, sharer: Any, conversations: Sequence[Messages | str], *,
                strategy: GatherStrategy | str = "last",
                span: int | None = None, add_generation_prompt: bool = True, reference_layout: bool = True,
                share_ids: bool | None = None, template_kwargs: Mapping[str, Any] | None = None,
                padding_side: str = "left") -> AlignedBatch:
    """Align a batch of conversations and pad it (receiver rows as `LoadedModel.chat_ids` gives them).

    `strategy` is the fuser's alignment setting: "last" gathers by character coverage; "first"
    and "longest" use the reference's training layout (`align(method=...)`) so published fusers
    run as trained, or, with `reference_layout=False`, the same-named pick over covering tokens.
    A str in `conversations` is plain text (not a user message); `share_ids` as in `align`.
    """
    if strategy not in GATHER_STRATEGIES:
        raise ConfigError(f"alignment strategy {strategy!r} is unknown; expected one of {', '.join(GATHER_STRATEGIES)}")
    method = strategy if strategy != "last" and reference_layout else "offsets"
    items = [align(receiver, sharer, c, add_generation_prompt=add_generation_prompt, method=method,
                   share_ids=share_ids, template_kwargs=template_kwargs) for c in conversations]
    return batch_alignments(items, receiver_pad_id=pad_token_id(_tokenizer_of(receiver)),
                            sharer_pad_id=pad_token_id(_tokenizer_of(sharer)), strategy=strategy, span=span,
                            padding_side=padding_side)
