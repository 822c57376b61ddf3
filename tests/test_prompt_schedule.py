"""A1111 prompt editing and alternation: the schedule, the refused syntax, and the denoise loop using it.

The rules these tests state are A1111's (its wiki and the examples in its prompt parser):
``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after; a ``when`` with a decimal
point is a fraction (step ``int(when * steps)``), without one a step number; ``[a|b]`` alternates
every step. A1111 makes a schedule ``[(end_at_step, text)]`` and its denoiser, counting model
calls from 0, uses at call ``i`` the first entry whose end step is ``>= i``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from likeness.errors import InvalidInput
from likeness.prompt_schedule import check_prompt, is_scheduled, prompt_schedule, texts_per_call

# A1111's documented examples at 10 steps (its prompt parser's own examples): prompt -> schedule.
A1111_EXAMPLES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt,schedule", A1111_EXAMPLES, ids=[p for p, _ in A1111_EXAMPLES])
def test_a1111_documented_schedules(prompt: str, schedule: list) -> None:
    assert prompt_schedule(prompt, 10) == schedule


def test_cat_to_dog_at_half_of_20_steps() -> None:
    # 'a [cat:dog:0.5] photo' at 20 steps: the switch step is int(0.5 * 20) = 10, so A1111's schedule is
    # "a cat photo" up to step 10, then "a dog photo". Its denoiser counts calls from 0 and uses an entry
    # while call <= end step: calls 0..10 (the first 11 of 20) are the cat, calls 11..19 the dog.
    assert prompt_schedule("a [cat:dog:0.5] photo", 20) == [(10, "a cat photo"), (20, "a dog photo")]
    calls = texts_per_call("a [cat:dog:0.5] photo", 20)
    assert calls == ["a cat photo"] * 11 + ["a dog photo"] * 9


@pytest.mark.parametrize("when,steps,cat_calls", [
    ("0.5", 30, 16),      # int(15.0) = 15 -> calls 0..15
    ("0.25", 30, 8),      # int(7.5) = 7 -> calls 0..7: the fraction is truncated, not rounded
    (".75", 8, 7),        # int(6.0) = 6
    ("1", 20, 2),         # an integer is a step number: step 1, not "all of it"
    ("1.0", 20, 20),      # with a decimal point it is the fraction 1.0: never switches
    ("5", 20, 6),
    ("25", 20, 20),       # capped at the steps: never switches
    ("0", 20, 0),         # below step 1: "dog" from the first call
    ("0.04", 20, 0),      # int(0.8) = 0
    ("-3", 20, 0),
    ("2e1", 30, 21),      # lark's number syntax; no "." so a step number (20)
    ("1e999", 20, 20),    # A1111 crashes on int(inf); saturating at the last step is the nearest reading
])
def test_when_is_a_fraction_with_a_decimal_point_and_a_step_without(when: str, steps: int, cat_calls: int) -> None:
    calls = texts_per_call(f"[cat:dog:{when}]", steps)
    assert calls == ["cat"] * cat_calls + ["dog"] * (steps - cat_calls)


def test_add_remove_alternate_and_nest() -> None:
    assert texts_per_call("a [red :5]hat", 8) == ["a hat"] * 6 + ["a red hat"] * 2  # [to:when] adds
    assert texts_per_call("a [red ::5]hat", 8) == ["a red hat"] * 6 + ["a hat"] * 2  # [from::when] removes
    # Alternation: call 0 and call 1 both use the step-1 entry, then one option per call.
    assert texts_per_call("[cat|dog] photo", 6) == ["cat photo", "cat photo", "dog photo", "cat photo",
                                                      "dog photo", "cat photo"]
    # Attention syntax inside a branch is kept for the attention parser.
    assert texts_per_call("[(red:1.3)|blue] hat", 3)[2] == "blue hat"
    assert texts_per_call("[(red:1.3)|blue] hat", 3)[0] == "(red:1.3) hat"
    assert prompt_schedule("[[a|b]:c:3]", 4) == [(1, "a"), (2, "b"), (3, "a"), (4, "c")]


def test_text_a1111_cannot_read_is_used_whole_for_every_step() -> None:
    for text in ("a | b [c:d:2]", "a [b:c:2] \\", "[a:b:c]", "(a:1.2", "[]", "a AND b"):
        assert prompt_schedule(text, 5) == [(5, text)]
        assert not is_scheduled(text)
    assert is_scheduled("[a|b]") and is_scheduled("[a:b:3]") and not is_scheduled("(a:1.2) [b]")


def test_comfyui_embedding_syntax_is_the_token() -> None:
    assert check_prompt("photo of embedding:3m1ly woman") == "photo of 3m1ly woman"
    assert check_prompt("(embedding:3m1ly.pt:1.2), x") == "(3m1ly:1.2), x"
    assert check_prompt("embedding:negatives/EasyNegative.safetensors, lowres", negative=True) == "EasyNegative, lowres"
    assert check_prompt("no_embedding:x") == "no_embedding:x"  # only the word itself


@pytest.mark.parametrize("text,negative,match", [
    ("a cat AND a dog", False, "'AND' .*composable"),
    ("a photo <lora:add_detail:0.8>", False, "extra-network tag '<lora:add_detail:0.8>' \\(lora\\).*remove the tag"),
    ("a photo <hypernet:anime:1>", False, "<hypernet:anime:1>"),
    ("lowres <lora:bad:1>", True, "negative prompt has the extra-network tag"),
])
def test_unsupported_syntax_is_refused_naming_it(text: str, negative: bool, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        check_prompt(text, negative=negative)


def test_and_in_a_negative_prompt_is_text_as_in_a1111() -> None:
    # A1111 splits AND only in the prompt; the negative prompt is one text.
    assert check_prompt("blurry AND lowres", negative=True) == "blurry AND lowres"
    assert check_prompt("salt and pepper") == "salt and pepper"


def test_parser_never_crashes_and_is_fast() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    pieces = st.sampled_from(["a", " ", "cat", "[", "]", "(", ")", ":", "|", "0.5", "3", ".25", "-1", "\\",
                              "BREAK", "1e3", "<", ">", "embedding:", "\n", "é"])
    prompts = st.one_of(st.text(max_size=60), st.lists(pieces, max_size=40).map("".join))

    # 150 examples run in about 1 s on one core.
    @settings(max_examples=150, deadline=None)
    @given(prompts, st.integers(1, 60))
    def check(text: str, steps: int) -> None:
        t0 = time.perf_counter()
        schedule = prompt_schedule(text, steps)
        calls = texts_per_call(text, steps)
        assert time.perf_counter() - t0 < 0.5
        ends = [e for e, _ in schedule]
        assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
        assert len(calls) == steps and set(calls) <= {t for _, t in schedule}
        if not any(c in text for c in "[|"):
            assert schedule == [(steps, text)]
        try:
            check_prompt(text)
        except InvalidInput:
            pass

    check()
    # Worst cases the fuzzer rarely builds: deep nesting and long prompts stay bounded.
    for text in ("([" * 5000, "[a|b]" * 2000, "[a:b:0.5]" * 2000, "(" * 20000):
        t0 = time.perf_counter()
        prompt_schedule(text, 30)
        assert time.perf_counter() - t0 < 5  # measured 0.8 s for "([" * 5000 on one core
    with pytest.raises(InvalidInput, match="20000"):
        prompt_schedule("a" * 20001, 30)


# ------------------------------------------------------------------ encoding and the denoise loop


def test_each_distinct_text_is_encoded_once_and_matches_the_static_encoding(sd15) -> None:
    import torch

    from likeness.prompts import encode_prompts

    cond = encode_prompts(sd15, ["a [cat:dog:0.5] photo", "[cat|dog] photo"], ["blurry"], steps=20)
    assert cond.scheduled and cond.steps == 20
    # "a cat photo", "a dog photo", "cat photo", "dog photo"; and "blurry": each text one row.
    assert cond.table["embeds"].shape[0] == 4 and cond.table["neg_embeds"].shape[0] == 1
    cat = encode_prompts(sd15, ["a cat photo"], ["blurry"])
    dog = encode_prompts(sd15, ["a dog photo"], ["blurry"])
    assert torch.equal(cond.at(10)["prompt_embeds"][0], cat["prompt_embeds"][0])
    assert torch.equal(cond.at(11)["prompt_embeds"][0], dog["prompt_embeds"][0])
    assert torch.equal(cond.at(11)["negative_prompt_embeds"][0], cat["negative_prompt_embeds"][0])
    assert torch.equal(cond.at(0)["prompt_embeds"][1], cond.at(1)["prompt_embeds"][1])
    assert not torch.equal(cond.at(1)["prompt_embeds"][1], cond.at(2)["prompt_embeds"][1])
    # As a mapping it is the first call's kwargs; pieces recombine into the same batch.
    assert torch.equal(cond["prompt_embeds"], cond.at(0)["prompt_embeds"])
    again = type(cond).concat([cond.select(0), cond.select(1)])
    for i in (0, 10, 11, 19):
        assert all(torch.equal(again.at(i)[k], cond.at(i)[k]) for k in cond)


def test_scheduled_prompts_need_steps_and_refused_syntax_stops_encoding(sd15) -> None:
    from likeness.prompts import encode_prompts

    with pytest.raises(InvalidInput, match="needs the step count"):
        encode_prompts(sd15, ["a [cat:dog:0.5] photo"], [""])
    with pytest.raises(InvalidInput, match="AND"):
        encode_prompts(sd15, ["a cat AND a dog"], [""], steps=10)
    with pytest.raises(InvalidInput, match="lora"):
        encode_prompts(sd15, ["a cat"], ["<lora:x:1>"], steps=10)
    static = encode_prompts(sd15, ["a (cat:1.2) photo"], [""], steps=10)
    assert not static.scheduled and all(len(c) == 1 for c in static.calls)


def _record_unet_conditioning(pipe):
    """(hook handle, list of (encoder_hidden_states, text_embeds or None) per UNet call)."""
    seen = []

    def hook(_module, args, kwargs):
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        extra = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        seen.append((hidden.detach().clone(), None if extra is None else extra.detach().clone()))

    return pipe.unet.register_forward_pre_hook(hook, with_kwargs=True), seen


@pytest.mark.parametrize("sampler,steps,calls", [("Euler", 6, 6), ("Heun", 4, 7)])
def test_denoise_switches_conditioning_where_a1111_does(sd15, sampler: str, steps: int, calls: int) -> None:
    import torch

    from likeness.backends.diffusion import denoise, schedule_steps
    from likeness.prompts import encode_prompts
    from likeness.spec import SamplingConfig

    sampling = SamplingConfig(sampler=sampler, steps=steps, cfg_scale=7.0, width=64, height=64)
    total = schedule_steps(sampling)  # Heun calls the model twice per step: A1111 schedules over 2x steps
    assert total == (2 * steps if sampler == "Heun" else steps)
    prompt = "a [cat:dog:0.5] photo"
    cond = encode_prompts(sd15, [prompt], ["blurry"], steps=total)
    static = {t: encode_prompts(sd15, [t], ["blurry"]) for t in ("a cat photo", "a dog photo")}
    handle, seen = _record_unet_conditioning(sd15)
    try:
        img = denoise(sd15, cond, [7], sampling)[0]
    finally:
        handle.remove()
    assert img.size == (64, 64) and len(seen) == calls
    want = texts_per_call(prompt, total)[:calls]
    for i, (hidden, _) in enumerate(seen):
        expect = torch.cat([static[want[i]]["negative_prompt_embeds"], static[want[i]]["prompt_embeds"]])
        assert torch.equal(hidden, expect), (i, want[i])
    assert "a cat photo" in want and "a dog photo" in want  # the run crosses the switch
    # The switch changes the image: the same seed with the cat alone differs.
    only_cat = denoise(sd15, static["a cat photo"], [7], sampling)[0]
    assert only_cat.tobytes() != img.tobytes()
    # Conditioning scheduled for another step count is refused, not silently misaligned.
    with pytest.raises(InvalidInput, match="scheduled for"):
        denoise(sd15, encode_prompts(sd15, [prompt], ["blurry"], steps=total + 1), [7], sampling)


def test_sdxl_denoise_switches_both_encoders_and_pooled(sdxl) -> None:
    import torch

    from likeness.backends.diffusion import denoise
    from likeness.prompts import encode_prompts
    from likeness.spec import SamplingConfig

    sampling = SamplingConfig(sampler="Euler", steps=4, cfg_scale=5.0, width=64, height=64)
    cond = encode_prompts(sdxl, ["[cat|dog] photo"], ["blurry"], steps=4)
    handle, seen = _record_unet_conditioning(sdxl)
    try:
        denoise(sdxl, cond, [3], sampling)
    finally:
        handle.remove()
    assert len(seen) == 4
    for i, (hidden, pooled) in enumerate(seen):
        kw = cond.at(i)
        assert torch.equal(hidden, torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]]))
        assert torch.equal(pooled, torch.cat([kw["negative_pooled_prompt_embeds"], kw["pooled_prompt_embeds"]]))
    assert not torch.equal(seen[1][0], seen[2][0]) and torch.equal(seen[0][0], seen[1][0])


def test_gallery_render_uses_the_schedule(sd15) -> None:
    # The gallery's render path encodes with the sampler's total steps and switches per call.
    from likeness.generate.gallery import PromptCache, render_images
    from likeness.generate.plan import PlannedImage
    from likeness.spec import SamplingConfig

    item = PlannedImage("x-0", 0, 0, 0, "closeup", "front shot", "a [cat:dog:0.5] photo", "blurry", 5)
    sampling = SamplingConfig(sampler="Euler", steps=4, cfg_scale=7.0, width=64, height=64)
    cache = PromptCache()
    handle, seen = _record_unet_conditioning(sd15)
    try:
        (out,) = render_images(sd15, [item], sampling, cache=cache)
    finally:
        handle.remove()
    assert out.png.startswith(b"\x89PNG") and len(seen) == 4
    assert [bool((seen[i][0] == seen[0][0]).all()) for i in range(4)] == [True, True, True, False]


# ------------------------------------------------------------------ Pad conds (A1111's "Pad prompt/negative prompt")

LONG = ", ".join(["red curly hair"] * 37) + ", freckles"  # two 75-token chunks


def _seq_lengths(pipe, sampling, cond, split=None):
    """(batch, sequence length) of every real UNet forward (the class's, below any wrapper), and the image."""
    import numpy as np
    import torch

    from likeness.backends.diffusion import denoise

    cls = type(pipe.unet)
    original = cls.forward
    seen = []

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append((encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]))
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    cls.forward = recording
    try:
        if split is None:
            img = denoise(pipe, cond, [11], sampling)[0]
        else:
            with split:
                img = denoise(pipe, cond, [11], sampling)[0]
    finally:
        cls.forward = original
    return seen, torch.from_numpy(np.asarray(img, dtype=np.float32))


def test_unpadded_prompt_and_negative_run_as_separate_unet_calls(sd15) -> None:
    from likeness.backends import diffusion
    from likeness.prompts import encode_prompts
    from likeness.spec import SamplingConfig

    sampling = SamplingConfig(sampler="Euler", steps=3, cfg_scale=7.0, width=64, height=64)
    # A1111's default: the 2-chunk prompt and the 1-chunk negative keep their lengths; the UNet sees
    # the negative (77) and the prompt (154) as two calls per step, each with its own length.
    plain = encode_prompts(sd15, [LONG], ["blurry"])
    calls, img_plain = _seq_lengths(sd15, sampling, plain)
    assert calls == [(1, 77), (1, 154)] * 3
    # With the option on, both are 154 long and go through the UNet as one batch of two.
    padded = encode_prompts(sd15, [LONG], ["blurry"], pad_conds=True)
    calls, img_padded = _seq_lengths(sd15, sampling, padded)
    assert calls == [(2, 154)] * 3
    assert (img_plain - img_padded).abs().max() > 0  # padding changes the image: why A1111 records it
    # The split path computes what one batch computes when the lengths agree (up to float rounding).
    short = encode_prompts(sd15, ["a cat"], ["blurry"])
    _, img_batch = _seq_lengths(sd15, sampling, short)
    calls, img_split = _seq_lengths(sd15, sampling, short, split=diffusion._separate_cond_uncond(sd15, 1, 77, 77))
    assert calls == [(1, 77), (1, 77)] * 3
    assert (img_batch - img_split).abs().max() <= 1  # at most one 8-bit level


def test_pad_conds_is_recorded_in_the_infotext_as_a1111_does(sd15) -> None:
    import dataclasses
    import io

    from PIL import Image

    from likeness.generate.gallery import render_images
    from likeness.generate.infotext import parse_infotext
    from likeness.generate.plan import PlannedImage
    from likeness.spec import SamplingConfig

    item = PlannedImage("x-0", 0, 0, 0, "closeup", "front shot", LONG, "blurry", 5)
    off = SamplingConfig(sampler="Euler", steps=2, cfg_scale=7.0, width=64, height=64)
    texts = {}
    for sampling in (off, dataclasses.replace(off, pad_conds=True)):
        (out,) = render_images(sd15, [item], sampling)
        texts[sampling.pad_conds] = Image.open(io.BytesIO(out.png)).info["parameters"]
    assert "Pad conds" not in texts[False]
    assert parse_infotext(texts[True]).extra.get("Pad conds") == "True"


def test_pad_conds_travels_in_a_spec_over_grpc() -> None:
    import dataclasses

    from likeness.serve.servicer import spec_from_pb, spec_to_pb
    from likeness.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "emily.toml")
    on = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, pad_conds=True))
    for s in (spec, on):
        assert spec_from_pb(spec_to_pb(dataclasses.asdict(s))).sampling.pad_conds is s.sampling.pad_conds
