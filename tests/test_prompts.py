"""A1111 prompt semantics: attention parser, 75-token chunks, weighted encoding, `likeness prompt`.

Runs the real CLIP tokenizer and the tiny random SD 1.5 / SDXL pipelines on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from likeness.prompts import (
    CHUNK_LENGTH,
    apply_weights,
    empty_chunk,
    encode_chunk_batch,
    encode_for_training,
    encode_prompts,
    parse_prompt_attention,
    tokenize_prompt,
)

REPO = Path(__file__).resolve().parent.parent
A1111_EXAMPLE = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))."


# ------------------------------------------------------------------ parser


def test_documented_a1111_example() -> None:
    parsed = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [t for t, _ in parsed] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    weights = dict((t, w) for t, w in parsed)
    assert weights["house"] == pytest.approx(1.573)  # 1.3 × 1.1 × 1.1 (the first "(" is never closed)
    assert weights["hill"] == pytest.approx(0.55)  # 0.5 × the unclosed 1.1
    assert weights["sky"] == pytest.approx(1.4641)  # 1.1 ** 4
    # A1111's own docstring gives 1.0 for "on": [on] ÷1.1, then the unclosed "(" ×1.1.
    assert weights["on"] == pytest.approx(1.0)
    assert weights[" a "] == pytest.approx(1.1) and weights["."] == pytest.approx(1.1)
    # The bracket alone, closed, gives the ≈0.909 the issue quotes.
    assert parse_prompt_attention("a [on] b")[1] == ("on", pytest.approx(0.9090909))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("plain text", [("plain text", 1.0)]),
        ("(x)", [("x", 1.1)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("((x))", [("x", 1.21)]),
        ("(x:1.5)", [("x", 1.5)]),
        ("( x : 0.25 )", [(" x ", 0.25)]),
        ("((a:1.5) b:2)", [("a", 3.0), (" b", 2.0)]),
        ("(a [b]:2)", [("a ", 2.0), ("b", 2 / 1.1)]),
        (r"\(x\) \[y\]", [("(x) [y]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"(a \(b\))", [("a (b)", 1.1)]),
        ("(unclosed", [("unclosed", 1.1)]),
        ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.0)]),
        ("(x:1.2", [("x:1.2", 1.1)]),
        ("x:1.2)", [("x:1.2)", 1.0)]),  # no open bracket: kept as text
        ("a) b] c", [("a) b] c", 1.0)]),
        ("(a)(b)", [("ab", 1.1)]),  # adjacent equal weights merge
        ("time: 5pm", [("time: 5pm", 1.0)]),
    ],
)
def test_parser_cases(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_break_keyword() -> None:
    # A1111 keeps the (empty) text between BREAK and "(": it tokenises to nothing.
    assert parse_prompt_attention("a cat BREAK (a dog)") == [("a cat", 1.0), ("BREAK", -1.0), ("", 1.0), ("a dog", 1.1)]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]  # only upper case
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]  # only a whole word


# ------------------------------------------------------------------ tokenisation


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_models / "sd15" / "tokenizer"))


def _body(chunk) -> list[int]:
    return list(chunk.ids[1 : 1 + chunk.token_count])


def test_chunk_layout(tokenizer) -> None:
    tp = tokenize_prompt(tokenizer, "a (cat:1.5)")
    (chunk,) = tp.chunks
    assert len(chunk.ids) == len(chunk.weights) == CHUNK_LENGTH + 2
    assert chunk.ids[0] == tokenizer.bos_token_id
    assert chunk.ids[3:] == (tokenizer.eos_token_id,) * 74
    assert chunk.weights[:4] == (1.0, 1.0, 1.5, 1.0) and set(chunk.weights[3:]) == {1.0}
    assert tp.token_count == 2 and tp.counter == "2/75"
    assert tokenize_prompt(tokenizer, "").chunks == (empty_chunk(tokenizer),)


def test_chunk_counts_and_nothing_truncated(tokenizer) -> None:
    assert len(tokenize_prompt(tokenizer, "cat " * 75).chunks) == 1
    tp = tokenize_prompt(tokenizer, "cat " * 76)
    assert [c.token_count for c in tp.chunks] == [75, 1] and tp.counter == "76/150"
    tp = tokenize_prompt(tokenizer, "cat " * 100 + "dog")
    assert sum(c.token_count for c in tp.chunks) == 101 and _body(tp.chunks[-1])[-1] == tokenizer.convert_tokens_to_ids("dog</w>")


def test_comma_backtrack(tokenizer) -> None:
    text = "cat " * 60 + ", " + "dog " * 20
    near = tokenize_prompt(tokenizer, text)
    # Full at 75 with the comma 15 tokens back: the words after the comma move on.
    assert [c.token_count for c in near.chunks] == [61, 20]
    assert _body(near.chunks[1]) == [tokenizer.convert_tokens_to_ids("dog</w>")] * 20
    assert [c.token_count for c in tokenize_prompt(tokenizer, text, comma_backtrack=0).chunks] == [75, 6]
    far = tokenize_prompt(tokenizer, "cat " * 30 + ", " + "dog " * 50)  # comma 45 tokens back
    assert [c.token_count for c in far.chunks] == [75, 6]


def test_break_starts_a_new_chunk(tokenizer) -> None:
    tp = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    assert [c.token_count for c in tp.chunks] == [2, 2]
    assert [c.token_count for c in tokenize_prompt(tokenizer, "a cat BREAK (a dog)").chunks] == [2, 2]


def test_textual_inversion_tokens_stay_whole(tiny_models: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_models / "sd15" / "tokenizer"))
    tok.add_tokens(["3m1ly", "3m1ly_1", "3m1ly_2"])
    run = tok.convert_tokens_to_ids(["3m1ly", "3m1ly_1", "3m1ly_2"])
    comma = tok.convert_tokens_to_ids(",</w>")
    # One id per added token, and the bare name expands to all its vectors.
    assert _body(tokenize_prompt(tok, "3m1ly, (3m1ly:1.2)").chunks[0])[:4] == run + [comma]
    assert tokenize_prompt(tok, "(3m1ly:1.2)").chunks[0].weights[1:4] == (1.2, 1.2, 1.2)
    assert _body(tokenize_prompt(tok, "3m1ly 3m1ly_1 3m1ly_2").chunks[0]) == run  # spelled out: not doubled
    # 73 tokens then a 3-vector token: it moves to the next chunk instead of being cut.
    tp = tokenize_prompt(tok, "cat " * 73 + "3m1ly")
    assert [c.token_count for c in tp.chunks] == [73, 3] and _body(tp.chunks[1]) == run


# ------------------------------------------------------------------ encoding


def test_unit_weights_equal_plain_diffusers(sd15) -> None:
    import torch

    out = encode_prompts(sd15, ["a photo of a cat"], ["blurry, lowres"])
    with torch.no_grad():
        pe, ne = sd15.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry, lowres")
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds"}
    assert torch.equal(out["prompt_embeds"], pe) and torch.equal(out["negative_prompt_embeds"], ne)
    assert not out["prompt_embeds"].requires_grad


def test_long_prompt_two_chunks_and_negative_padded(sd15) -> None:
    import torch

    long_prompt = ", ".join(["red curly hair"] * 37) + ", freckles"  # ~150 tokens
    assert len(tokenize_prompt(sd15.tokenizer, long_prompt).chunks) == 2
    # A1111's default: each side keeps its own chunk count (its "Pad prompt/negative prompt" is off).
    plain = encode_prompts(sd15, [long_prompt], ["blurry"])
    assert plain["prompt_embeds"].shape == (1, 154, 32) and plain["negative_prompt_embeds"].shape == (1, 77, 32)
    out = encode_prompts(sd15, [long_prompt], ["blurry"], pad_conds=True)
    assert out["prompt_embeds"].shape == (1, 154, 32)
    assert out["negative_prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(out["negative_prompt_embeds"][:, :77], plain["negative_prompt_embeds"])
    # With the option, the negative's second chunk is the encoding of an empty prompt (A1111's padding).
    empty = encode_prompts(sd15, [""], [""])["prompt_embeds"]
    assert torch.allclose(out["negative_prompt_embeds"][:, 77:], empty, atol=1e-6)
    # Batch items of different length are padded to the same chunk count.
    batch = encode_prompts(sd15, ["a cat", long_prompt], [], pad_conds=True)
    assert batch["prompt_embeds"].shape == batch["negative_prompt_embeds"].shape == (2, 154, 32)
    assert encode_prompts(sd15, ["a cat", long_prompt], [])["prompt_embeds"].shape == (2, 154, 32)
    # The kwargs drive a real pipeline call with 154 positions of conditioning.
    image = sd15(**out, num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_long_negative_prompt_is_not_truncated(sd15) -> None:
    import torch

    from likeness.spec import load_spec

    negative = load_spec(REPO / "examples" / "emily.toml").negative_prompt
    assert tokenize_prompt(sd15.tokenizer, negative).token_count > CHUNK_LENGTH
    assert negative.endswith("oversaturated")
    changed = negative[: -len("oversaturated")] + "black and white photo"
    a = encode_prompts(sd15, ["photo of 3m1ly"], [negative])["negative_prompt_embeds"]
    b = encode_prompts(sd15, ["photo of 3m1ly"], [changed])["negative_prompt_embeds"]
    assert a.shape == b.shape and a.shape[1] == 154
    assert torch.equal(a[:, :77], b[:, :77])  # the first chunk does not hold the last words
    assert not torch.allclose(a[:, 77:], b[:, 77:])  # the last words change the conditioning


def test_apply_weights_restores_each_items_mean() -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 8, generator=gen) + torch.tensor([0.5, -2.0]).view(2, 1, 1)
    weights = torch.ones(2, 77)
    weights[:, 3:6] = torch.tensor([1.5, 0.8, 1.21])
    out = apply_weights(hidden, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    ratio = out[:, 3] / (hidden[:, 3] * 1.5)  # weighted tokens keep their relative emphasis
    assert torch.allclose(out[:, 3:6] / hidden[:, 3:6], weights[:, 3:6].unsqueeze(-1) * ratio[:, :1].unsqueeze(-1), atol=1e-4)
    assert apply_weights(hidden, torch.ones(2, 77)) is hidden  # weight 1.0 everywhere: untouched
    assert apply_weights(hidden.half(), weights).dtype == torch.float16


def test_weights_scale_tokens_and_restore_mean(sd15) -> None:
    import torch

    chunk = tokenize_prompt(sd15.tokenizer, "a (cat:1.5) on a [[mat]]").chunks[0]
    ids = torch.tensor([chunk.ids])
    weights = torch.tensor([chunk.weights])
    plain, _ = encode_chunk_batch(sd15.text_encoder, ids)
    weighted, _ = encode_chunk_batch(sd15.text_encoder, ids, weights)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    scale = plain.mean() / (plain * weights.unsqueeze(-1)).mean()
    assert torch.allclose(weighted, plain * weights.unsqueeze(-1) * scale, atol=1e-5)
    assert torch.allclose(weighted[0, 2], plain[0, 2] * 1.5 * scale, atol=1e-5)
    via_pipe = encode_prompts(sd15, ["a (cat:1.5) on a [[mat]]"], [""])["prompt_embeds"]
    assert torch.allclose(via_pipe, weighted, atol=1e-6)
    # Per-item rescaling: an item's result does not depend on its batch mates.
    two = apply_weights(torch.cat([plain, plain * 3]), torch.cat([weights, weights]))
    assert torch.allclose(two[0], weighted[0], atol=1e-6)


def test_clip_skip(sd15) -> None:
    import torch

    ids = torch.tensor([tokenize_prompt(sd15.tokenizer, "a cat").chunks[0].ids])
    with torch.no_grad():
        hs = sd15.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = sd15.text_encoder.final_layer_norm(hs[-2])
    got = encode_prompts(sd15, ["a cat"], [""], clip_skip=2)["prompt_embeds"]
    assert torch.allclose(got, expected, atol=1e-6)


def test_training_encoding_keeps_gradients(sd15) -> None:
    emb = sd15.text_encoder.get_input_embeddings().weight
    hidden, pooled = encode_for_training(sd15.tokenizer, sd15.text_encoder, ["a photo of a cat", "a dog"], grad=True)
    assert hidden.shape == (2, 77, 32) and pooled is None
    hidden.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0 and emb.grad.isfinite().all()
    emb.grad = None
    weighted, _ = encode_for_training(sd15.tokenizer, sd15.text_encoder, ["a (cat:1.2)"], grad=True)
    weighted.sum().backward()
    assert emb.grad.isfinite().all()
    emb.grad = None
    frozen, _ = encode_for_training(sd15.tokenizer, sd15.text_encoder, ["a cat"], grad=False)
    assert not frozen.requires_grad


def test_sdxl_shapes_and_plain_equivalence(tiny_models: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models / "sdxl"))
    long_prompt = ", ".join(["red curly hair"] * 37)
    out = encode_prompts(pipe, [long_prompt, "a cat"], ["blurry"], pad_conds=True)
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (2, 154, 64)
    assert encode_prompts(pipe, [long_prompt, "a cat"], ["blurry"])["negative_prompt_embeds"].shape == (2, 77, 64)
    assert out["pooled_prompt_embeds"].shape == out["negative_pooled_prompt_embeds"].shape == (2, 32)
    short = encode_prompts(pipe, ["a photo of a cat"], ["blurry"])
    with torch.no_grad():
        ref = pipe.encode_prompt("a photo of a cat", negative_prompt="blurry", device="cpu")
    keys = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    for key, expected in zip(keys, ref):
        assert torch.allclose(short[key], expected, atol=1e-5), key
    # An all-empty negative prompt is zeros on SDXL (A1111 and diffusers' force_zeros_for_empty_prompt).
    zero = encode_prompts(pipe, ["a cat"], [""])
    assert not zero["negative_prompt_embeds"].any() and not zero["negative_pooled_prompt_embeds"].any()


def test_mismatched_negative_count_is_invalid(sd15) -> None:
    from likeness.errors import InvalidInput

    with pytest.raises(InvalidInput, match="one negative prompt per prompt"):
        encode_prompts(sd15, ["a", "b", "c"], ["x", "y"])


# ------------------------------------------------------------------ CLI


def test_describe_and_cli_json(tiny_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from likeness.cli.main import main

    long_prompt = ", ".join(["red curly hair"] * 37)
    assert main(["prompt", A1111_EXAMPLE, "--negative", long_prompt]) == 0
    doc = json.loads(capsys.readouterr().out)
    prompt = doc["prompt"]
    assert doc["tokenizer"].endswith("tokenizer") and prompt["chunk_count"] == 1
    tokens = prompt["chunks"][0]["tokens"]
    by_text = {t["text"]: t["weight"] for t in tokens}
    assert by_text["house"] == pytest.approx(1.573) and by_text["sky"] == pytest.approx(1.4641)
    assert prompt["token_count"] == len(tokens) == prompt["chunks"][0]["token_count"]
    assert doc["negative_prompt"]["chunk_count"] == 2 and doc["chunks_after_padding"] == 2
    assert doc["negative_prompt"]["positions"] == 154
    assert sum(c["token_count"] for c in doc["negative_prompt"]["chunks"]) == doc["negative_prompt"]["token_count"]


def test_counter_counts_padded_chunks_as_a1111_does(tokenizer) -> None:
    # A1111 (sd_hijack_clip.tokenize_line) adds 75 for every chunk it closes before the
    # end; the counter said "4/75" for a prompt that takes two chunks.
    assert tokenize_prompt(tokenizer, "a cat BREAK a dog").counter == "77/150"
    cut = tokenize_prompt(tokenizer, "cat " * 60 + ", " + "dog " * 20)  # chunks [61, 20]
    assert cut.counter == "95/150"
    assert tokenize_prompt(tokenizer, "cat " * 76).counter == "76/150"
    assert tokenize_prompt(tokenizer, "").counter == "0/75"
