"""Prompts with A1111 semantics: attention weights, 75-token chunks, weighted encoding.

Three layers, each usable alone:

1. :func:`parse_prompt_attention` turns ``a (red:1.2) [hat]`` into text
   fragments with weights, exactly as AUTOMATIC1111's web UI reads them.
2. :func:`tokenize_prompt` turns a prompt into 77-id chunks
   (``[BOS] + 75 tokens + [EOS]``) with one weight per id. Long prompts are
   never truncated; a chunk boundary backs up to a nearby comma; ``BREAK``
   starts a new chunk; multi-vector textual-inversion tokens stay in one chunk.
3. :func:`encode_prompts` encodes every chunk with the pipeline's text
   encoder(s), multiplies hidden states by the weights, restores each chunk's
   mean (A1111's default "Original" emphasis) and concatenates the chunks:
   the result (:class:`likeness.conditioning.Conditioning`) is the
   ``prompt_embeds`` family of kwargs for a diffusers call, per model call when
   a prompt uses A1111 prompt editing ``[from:to:when]`` or alternation ``[a|b]``
   (scheduled by :mod:`likeness.prompt_schedule` before the attention pass, as
   A1111 does; ``AND`` and ``<lora:...>`` tags are refused).
   :func:`encode_chunk_batch` is the lower-level piece the trainer uses (with
   gradients flowing into the token-embedding matrix when asked).

torch is imported lazily so that parsing and the ``likeness prompt`` command
stay light.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from likeness.backends.protocols import Pipeline
from likeness.conditioning import Conditioning
from likeness.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    import torch

# A1111: "(x)" multiplies attention by 1.1, "[x]" divides by 1.1.
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# Tokens per chunk between BOS and EOS (CLIP's 77-position window minus 2).
CHUNK_LENGTH = 75
# A1111's default "comma padding backtrack": a chunk that fills up within this many
# tokens after a comma moves the words after the comma into the next chunk.
COMMA_BACKTRACK = 20
# Marker weight of a BREAK fragment in the parsed list (A1111 uses -1 too).
BREAK_WEIGHT = -1.0
# Largest attention weight (in magnitude) a prompt may give. A1111 sets no bound, and its users
# write 0-2 (ten nested parentheses are 2.6); "(cat:1e39)" overflowed float32 to inf and the
# service returned an all-black image with status OK. 100 is far above any useful weight (48
# nested parentheses) and keeps weight x hidden state finite in fp16 (max 65,504) for hidden
# values up to 655. Not measured on a real model: a bound on nonsense, not a tuned threshold.
MAX_ATTENTION_WEIGHT = 100.0

_ATTENTION_RE = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\   # escapes (a lone backslash is dropped)
    | \(  | \[                              # openers
    | :\s*([+-]?[.\d]+)\s*\)                 # ":1.3)" closes a round bracket with a weight
    | \)  | \]                              # closers
    | [^\\()\[\]:]+                          # plain text
    | :                                      # a colon that is not a weight
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs with A1111's attention syntax.

    ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)`` ×w; nesting multiplies; ``\\(``,
    ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal characters; an unclosed
    bracket applies to the end of the prompt; a ``:w)`` without an open round
    bracket and stray closers are kept as text. A weight that is not finite or
    beyond :data:`MAX_ATTENTION_WEIGHT` in magnitude is :class:`InvalidInput`. ``BREAK`` (upper case, a whole
    word) is returned as ``("BREAK", -1.0)`` and starts a new chunk. Adjacent
    fragments of equal weight are merged. An empty prompt gives ``[("", 1.0)]``.

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1]
    ('house', 1.5730000000000004)
    """
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION_RE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(x:1.2.3)" — A1111 would crash; keep it as text instead
                res.append([piece, 1.0])
                continue
            multiply_from(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_RE.split(piece)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])

    # Unclosed brackets run to the end, innermost applied first as A1111 does.
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    if not res:
        return [("", 1.0)]
    for text_, weight_ in res:
        if not (math.isfinite(weight_) and abs(weight_) <= MAX_ATTENTION_WEIGHT):
            raise InvalidInput(
                f"prompt: the weight of {text_.strip()[:40]!r} comes to {weight_:g}; attention weights must be "
                f"finite and at most {MAX_ATTENTION_WEIGHT:g} in magnitude (A1111 prompts use about 0-2, "
                "e.g. (red hair:1.3))"
            )
    merged: list[list[Any]] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(str(t), float(w)) for t, w in merged]


@dataclass(frozen=True)
class PromptChunk:
    """One 77-position window: ids and per-id weights, ready for a text encoder."""

    # [BOS] + 75 ids + [EOS]; after the first EOS every id is the tokenizer's pad id
    # (EOS for SD 1.x, "!" for SDXL's second tokenizer), as the tokenizer itself pads.
    ids: tuple[int, ...]
    # One weight per id; 1.0 on BOS, EOS and padding.
    weights: tuple[float, ...]
    # How many prompt tokens the chunk holds (not counting BOS/EOS/padding).
    token_count: int


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as chunks, plus A1111's token counter (``"80/150"``)."""

    chunks: tuple[PromptChunk, ...]
    # Prompt tokens in all chunks (a chunk cut at a comma counts only what it holds).
    token_count: int

    @property
    def counter(self) -> str:
        """The counter the A1111 UI shows next to a prompt box.

        A1111 counts every chunk before the last as a full 75 (a chunk closed by
        ``BREAK`` or cut at a comma is padded to 75), so ``a BREAK b`` reads
        ``76/150``: the counter must agree with the chunks the prompt really uses.
        """
        shown = CHUNK_LENGTH * (len(self.chunks) - 1) + self.chunks[-1].token_count if self.chunks else 0
        target = math.ceil(max(shown, 1) / CHUNK_LENGTH) * CHUNK_LENGTH
        return f"{shown}/{target}"


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise InvalidInput("the tokenizer has no BOS/EOS tokens; a CLIP tokenizer is needed")
    pad = tokenizer.pad_token_id
    return int(bos), int(eos), int(eos if pad is None else pad)


def _added_groups(tokenizer: Any) -> dict[int, list[int]]:
    """Multi-vector textual-inversion tokens: id of ``name`` -> ids of name, name_1, name_2, ...

    diffusers loads an n-vector embedding as added tokens ``name``, ``name_1``, ...;
    the prompt names only ``name``, so it expands to the whole run.
    """
    added: dict[str, int] = dict(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    groups: dict[int, list[int]] = {}
    for name, tid in added.items():
        run, i = [tid], 1
        while f"{name}_{i}" in added:
            run.append(added[f"{name}_{i}"])
            i += 1
        groups[tid] = run
    return groups


def _units(ids: list[int], groups: dict[int, list[int]]) -> list[list[int]]:
    """Split a fragment's ids into units that must not be cut: single ids or TI runs."""
    units: list[list[int]] = []
    pos = 0
    while pos < len(ids):
        run = groups.get(ids[pos])
        if run and len(run) > 1:
            # The prompt may already spell the run out ("x x_1 x_2"); consume it either way.
            n = len(run) if ids[pos : pos + len(run)] == run else 1
            units.append(list(run))
            pos += n
        else:
            units.append([ids[pos]])
            pos += 1
    return units


def _comma_id(tokenizer: Any) -> int | None:
    """The id of "," (cached on the tokenizer: get_vocab() copies 49k entries per call)."""
    cached = getattr(tokenizer, "_likeness_comma_id", False)
    if cached is False:
        cached = tokenizer.convert_tokens_to_ids(",</w>")
        if cached == getattr(tokenizer, "unk_token_id", None):
            cached = None
        try:
            tokenizer._likeness_comma_id = cached
        except AttributeError:  # a tokenizer that refuses attributes: look it up each time
            pass
    return cached


def tokenize_prompt(tokenizer: Any, text: str, *, comma_backtrack: int = COMMA_BACKTRACK) -> TokenizedPrompt:
    """Tokenize ``text`` into 77-id chunks with A1111's weights and chunking rules.

    Nothing is truncated. When a chunk is full and a comma lies within
    ``comma_backtrack`` tokens before the end, the tokens after that comma
    move to the next chunk (0 disables). ``BREAK`` closes the current chunk.
    Tokens of the tokenizer's added vocabulary are one id each; a multi-vector
    embedding (``name``, ``name_1``, ...) is placed whole in one chunk.
    """
    bos, eos, pad = _special_ids(tokenizer)
    comma = _comma_id(tokenizer)
    groups = _added_groups(tokenizer)
    parsed = parse_prompt_attention(text)
    texts = [t for t, _ in parsed]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    total = 0

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma, total
        count = len(ids)
        total += count
        body = ids + [eos] * (CHUNK_LENGTH - count)
        full = [bos] + body + [eos]
        first_eos = full.index(eos)  # A1111: everything after the first EOS becomes padding
        full = full[: first_eos + 1] + [pad] * (len(full) - first_eos - 1)
        chunks.append(PromptChunk(tuple(full), tuple([1.0] + weights + [1.0] * (CHUNK_LENGTH - count + 1)), count))
        ids, weights, last_comma = [], [], -1

    for (fragment, weight), frag_ids in zip(parsed, encoded):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for unit in _units(list(frag_ids), groups):
            if len(unit) == 1 and unit[0] == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack > 0
                and len(ids) == CHUNK_LENGTH
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_LENGTH or (len(unit) <= CHUNK_LENGTH and len(ids) + len(unit) > CHUNK_LENGTH):
                close_chunk()
            for tid in unit:  # a run longer than a whole chunk cannot stay together
                if len(ids) == CHUNK_LENGTH:
                    close_chunk()
                ids.append(int(tid))
                weights.append(float(weight))
    if ids or not chunks:
        close_chunk()
    return TokenizedPrompt(tuple(chunks), total)


def empty_chunk(tokenizer: Any) -> PromptChunk:
    """The chunk of an empty prompt: what A1111 pads the shorter of prompt/negative with."""
    return tokenize_prompt(tokenizer, "").chunks[0]


def describe_prompt(tokenizer: Any, text: str, steps: int = 20) -> dict[str, Any]:
    """JSON-ready view of how ``text`` is chunked and weighted (``likeness prompt``).

    A prompt with A1111 prompt editing or alternation also gets its ``schedule`` over ``steps``
    (A1111's default 20); the chunks are those of its first step's text.
    """
    from likeness.prompt_schedule import check_prompt, is_scheduled, prompt_schedule

    original = text
    text = check_prompt(text)
    schedule = prompt_schedule(text, steps) if is_scheduled(text) else None
    if schedule:
        text = schedule[0][1]
    tp = tokenize_prompt(tokenizer, text)
    chunks = []
    for n, chunk in enumerate(tp.chunks):
        body_ids = chunk.ids[1 : 1 + chunk.token_count]
        body_w = chunk.weights[1 : 1 + chunk.token_count]
        names = tokenizer.convert_ids_to_tokens(list(body_ids))
        chunks.append({
            "index": n,
            "token_count": chunk.token_count,
            "tokens": [
                {"id": tid, "token": name, "text": tokenizer.decode([tid]).strip(), "weight": round(w, 6)}
                for tid, name, w in zip(body_ids, names, body_w)
            ],
        })
    out: dict[str, Any] = {
        "prompt": original,
        "fragments": [{"text": t, "weight": round(w, 6)} for t, w in parse_prompt_attention(text)],
        "chunks": chunks,
        "chunk_count": len(tp.chunks),
        "token_count": tp.token_count,
        "counter": tp.counter,
        "positions": len(tp.chunks) * (CHUNK_LENGTH + 2),
    }
    if schedule:
        out["schedule"] = [{"end_at_step": end, "text": t} for end, t in schedule]
    return out


# ---------------------------------------------------------------- encoding (torch)

HiddenLayer = Literal["last", "penultimate"]


def encode_chunk_batch(
    text_encoder: Any,
    ids: "torch.Tensor",
    weights: "torch.Tensor | None" = None,
    *,
    layer: HiddenLayer = "last",
    clip_skip: int = 1,
    grad: bool = False,
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Encode a batch of single chunks ``ids`` [B, 77]; return (hidden [B, 77, D], pooled or None).

    ``layer="last"`` is SD 1.x: the last layer, or with ``clip_skip`` = k > 1 the
    k-th layer from the end followed by the final layer norm (A1111's "Clip
    skip"). ``layer="penultimate"`` is SDXL: ``hidden_states[-(clip_skip + 1)]``
    without the final norm. ``weights`` [B, 77] multiply the hidden states and each
    item is rescaled to its unweighted mean. ``grad=True`` keeps the autograd
    graph (textual-inversion training); otherwise this runs under no_grad.
    ``pooled`` is the projected text embedding of a ``CLIPTextModelWithProjection``.
    """
    import torch

    if clip_skip < 1:
        raise InvalidInput(f"clip_skip must be 1 or more (1 = last layer, as in A1111), got {clip_skip}")
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        ids = ids.to(text_encoder.device)
        want_hidden = layer == "penultimate" or clip_skip > 1
        out = text_encoder(ids, output_hidden_states=want_hidden, return_dict=True)
        if layer == "penultimate":
            hidden = out.hidden_states[-(clip_skip + 1)]
        elif clip_skip > 1:
            # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
            final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
            hidden = final_norm(out.hidden_states[-clip_skip])
        else:
            hidden = out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        if weights is not None:
            hidden = apply_weights(hidden, weights.to(hidden.device))
    return hidden, pooled


def apply_weights(hidden: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """Multiply [B, T, D] hidden states by [B, T] weights, then restore each item's mean.

    A1111's default emphasis rescales by ``original_mean / new_mean``; it takes
    the mean over the whole batch of a chunk, we take it per prompt so that an
    image's conditioning never depends on what else shares its batch (identical
    for the usual batch of one prompt). Computed in float32 for fp16 encoders.
    """
    import torch

    if bool((weights == 1).all()):
        return hidden  # the identity, without adding a 0/0-prone ratio to an autograd graph
    h32 = hidden.float()
    original = h32.mean(dim=(1, 2), keepdim=True)
    weighted = h32 * weights.float().unsqueeze(-1)
    new = weighted.mean(dim=(1, 2), keepdim=True)
    # A zero weighted mean leaves nothing to restore; the safe denominator keeps gradients finite.
    zero = new == 0
    ratio = torch.where(zero, torch.ones_like(new), original / torch.where(zero, torch.ones_like(new), new))
    return (weighted * ratio).to(hidden.dtype)


def _chunk_tensors(chunks: Sequence[PromptChunk]) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    return (
        torch.tensor([c.ids for c in chunks], dtype=torch.long),
        torch.tensor([c.weights for c in chunks], dtype=torch.float32),
    )


def _encode_texts(
    tokenizer: Any, text_encoder: Any, texts: Sequence[str], n_chunks: int, layer: HiddenLayer, clip_skip: int
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Encode prompts padded to ``n_chunks`` chunks each: ([B, 77*n, D], pooled of chunk 0)."""
    import torch

    padded = []
    for text in texts:
        chunks = list(tokenize_prompt(tokenizer, text).chunks)
        chunks += [empty_chunk(tokenizer)] * (n_chunks - len(chunks))
        padded.append(chunks)
    per_chunk, pooled0 = [], None
    for k in range(n_chunks):  # chunk k of every prompt in one encoder call
        ids, weights = _chunk_tensors([p[k] for p in padded])
        hidden, pooled = encode_chunk_batch(text_encoder, ids, weights, layer=layer, clip_skip=clip_skip)
        per_chunk.append(hidden)
        if k == 0:
            pooled0 = pooled
    return torch.cat(per_chunk, dim=1), pooled0


def _broadcast(negative_prompts: Sequence[str] | None, n: int) -> list[str]:
    neg = list(negative_prompts or [])
    if not neg:
        return [""] * n
    if len(neg) == 1:
        return neg * n
    if len(neg) != n:
        raise InvalidInput(
            f"got {n} prompts but {len(neg)} negative prompts; give one negative prompt per prompt, "
            "a single one for all, or none"
        )
    return neg


def _per_call_texts(text: str, steps: int | None, *, negative: bool) -> list[str]:
    """The text of every model call (one entry when static), A1111 syntax checked."""
    from likeness.prompt_schedule import check_prompt, is_scheduled, texts_per_call

    text = check_prompt(text, negative=negative)
    if steps is None:
        if is_scheduled(text):
            raise InvalidInput(
                f"{'negative ' if negative else ''}prompt {text[:80]!r} uses A1111 prompt editing [from:to:when] or "
                "alternation [a|b], which needs the step count: pass steps= to encode_prompts"
            )
        return [text]
    texts = texts_per_call(text, steps)
    return texts if len(set(texts)) > 1 else texts[:1]


def scheduled_texts(text: str, steps: int, *, negative: bool = False) -> list[str]:
    """The distinct texts ``text`` conditions on over ``steps`` (for chunk counts and previews)."""
    return list(dict.fromkeys(_per_call_texts(text, steps, negative=negative)))


def encode_prompts(
    pipe: Pipeline,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    clip_skip: int = 1,
    *,
    steps: int | None = None,
    pad_conds: bool = False,
) -> Conditioning:
    """Encode prompts with A1111 semantics into per-call conditioning for a diffusers pipeline.

    The result (:class:`Conditioning`) is, as a mapping, ``prompt_embeds`` and
    ``negative_prompt_embeds`` (and for SDXL, detected by ``pipe.text_encoder_2``,
    ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds``) on the pipeline's device and
    dtype. With ``steps`` (A1111's total steps: twice the steps for Heun, DPM2 and DPM++ SDE, see
    :func:`likeness.backends.diffusion.schedule_steps`), prompt editing ``[from:to:when]`` and
    alternation ``[a|b]`` switch the conditioning at the model call where A1111 switches it
    (:mod:`likeness.prompt_schedule`); each distinct text is encoded once. Without ``steps`` a
    scheduled prompt is an error. ``AND`` and extra-network tags are refused; ComfyUI's
    ``embedding:name`` is the token ``name``.
    The prompts of a batch are padded with empty chunks to one chunk count, the negative prompts to
    another; ``pad_conds=True`` (A1111's "Pad prompt/negative prompt", off by default there too)
    pads both to the larger, and the infotext then records ``Pad conds: True``. SDXL concatenates both encoders' penultimate hidden states on
    the feature axis; the pooled embedding is text_encoder_2's of the first chunk; an empty
    negative prompt gives zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (as
    A1111 and diffusers do). ``clip_skip`` follows A1111: 1 = last layer (SD 1.x), 2 = one earlier.
    """
    import torch

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise InvalidInput("encode_prompts needs at least one prompt")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise InvalidInput(f"steps must be a whole number of 1 or more, got {steps!r}")
    negatives = _broadcast(negative_prompts, len(prompts))
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoders: list[tuple[Any, Any]] = []
    if getattr(pipe, "text_encoder", None) is not None:
        encoders.append((pipe.tokenizer, pipe.text_encoder))
    if sdxl:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    if not encoders:
        raise InvalidInput("the pipeline has no text encoder to encode prompts with")
    layer: HiddenLayer = "penultimate" if sdxl else "last"

    pos_calls = [_per_call_texts(p, steps, negative=False) for p in prompts]
    neg_calls = [_per_call_texts(n, steps, negative=True) for n in negatives]
    zero_empty = sdxl and bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", False))
    pos_texts = list(dict.fromkeys(t for texts in pos_calls for t in texts))
    neg_texts = list(dict.fromkeys(t for texts in neg_calls for t in texts))

    def chunks(texts: list[str]) -> int:
        # Both SDXL tokenizers share the vocabulary; counting with each guards added tokens in one only.
        return max(len(tokenize_prompt(tok, t).chunks) for tok, _ in encoders for t in texts)

    # A1111 pads a prompt to its negative prompt's chunk count (or the other way) only with its
    # "Pad prompt/negative prompt" option (off by default); otherwise each side keeps its own
    # length and the denoiser runs them as separate UNet calls (backends.diffusion.denoise).
    n_pos, n_neg = chunks(pos_texts), chunks(neg_texts)
    if pad_conds:
        n_pos = n_neg = max(n_pos, n_neg)
    device = getattr(pipe, "_execution_device", None) or encoders[0][1].device
    dtype = encoders[-1][1].dtype
    table: dict[str, torch.Tensor] = {}
    rows: dict[tuple[str, bool], int] = {}
    for side, texts, n_chunks, negative in (("", pos_texts, n_pos, False), ("neg_", neg_texts, n_neg, True)):
        zero = negative and zero_empty and "" in texts  # an empty negative prompt is a zero row
        encode = [t for t in texts if not (zero and t == "")] or [""]
        hiddens, pooled = [], None
        for tokenizer, encoder in encoders:
            hidden, pooled_k = _encode_texts(tokenizer, encoder, encode, n_chunks, layer, clip_skip)
            hiddens.append(hidden)
            pooled = pooled_k if sdxl else None
        embeds = torch.cat(hiddens, dim=-1)
        index = {t: i for i, t in enumerate(encode)}
        for t in texts:
            rows[(t, negative)] = embeds.shape[0] if zero and t == "" else index[t]
        if zero:
            embeds = torch.cat([embeds, torch.zeros_like(embeds[:1])])
            pooled = torch.cat([pooled, torch.zeros_like(pooled[:1])]) if pooled is not None else None
        table[side + "embeds"] = embeds.to(device=device, dtype=dtype)
        if sdxl:
            if pooled is None:
                raise InvalidInput("SDXL's second text encoder gave no pooled embedding; it needs a projection head")
            table[side + "pooled"] = pooled.to(device=device, dtype=dtype)
    calls = []
    for pos, neg in zip(pos_calls, neg_calls):
        n = max(len(pos), len(neg))
        calls.append([(rows[(pos[min(i, len(pos) - 1)], False)], rows[(neg[min(i, len(neg) - 1)], True)])
                      for i in range(n)])
    return Conditioning(table, calls, steps, sdxl)


def encode_for_training(
    tokenizer: Any,
    text_encoder: Any,
    texts: Sequence[str],
    *,
    layer: HiddenLayer = "last",
    clip_skip: int = 1,
    grad: bool = True,
) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Encode captions as single chunks (first 75 tokens, weights applied) for training.

    Training captions are short; a caption longer than one chunk is cut to its
    first chunk so that every item has 77 positions like diffusers' training
    scripts. With ``grad=True`` gradients flow into ``text_encoder``'s token
    embeddings (textual inversion). Returns (hidden [B, 77, D], pooled or None).
    """
    chunks = [tokenize_prompt(tokenizer, t).chunks[0] for t in texts]
    if not chunks:
        raise InvalidInput("encode_for_training needs at least one caption")
    ids, weights = _chunk_tensors(chunks)
    return encode_chunk_batch(text_encoder, ids, weights, layer=layer, clip_skip=clip_skip, grad=grad)
