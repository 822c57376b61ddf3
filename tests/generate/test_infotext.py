"""A1111 infotext: format, parse, round trip, and reading it back from image files."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from likeness.generate.infotext import InfoText, format_infotext, parse_infotext, png_bytes, read_parameters

# What A1111 1.10 writes for a typical txt2img image (PNG Info shows the same).
A1111_TEXT = """photo of a 25 year old Scottish woman, (red curly hair:1.2), freckles, closeup, front shot
Negative prompt: (worst quality, low quality:1.4), blurry
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3844612093, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "fav: 1234abcd, other: 5678", Version: v1.10.1"""


def test_parse_a1111_text():
    info = parse_infotext(A1111_TEXT)
    assert info.prompt.startswith("photo of a 25 year old") and info.prompt.endswith("front shot")
    assert info.negative_prompt == "(worst quality, low quality:1.4), blurry"
    assert (info.steps, info.sampler, info.cfg_scale, info.seed) == (30, "DPM++ 2M Karras", 7.0, 3844612093)
    assert (info.width, info.height, info.model, info.model_hash) == (512, 512, "v1-5-pruned-emaonly", "6ce0161689")
    assert info.extra == {"Lora hashes": "fav: 1234abcd, other: 5678", "Version": "v1.10.1"}


@pytest.mark.parametrize(
    "info",
    [
        InfoText("a cat", "", 30, "DPM++ 2M Karras", 7.0, 1, 512, 512, "v1-5", "6ce0161689"),
        InfoText("a (red:1.3) hat,\nsecond line: with colon", "ugly,\nblurry", 4, "Euler a", 6.5, 0, 64, 128, "sd15"),
        InfoText("", "only negative", 20, "DDIM", 1.0, 4294967295, 768, 512, ""),
        InfoText("weights \\(escaped\\) [less] BREAK next", "", 2, "UniPC", 12.0, 42, 64, 64, "m",
                 extra={"Clip skip": "2", "Note": 'has "quotes", and commas'}),
    ],
)
def test_round_trip(info):
    text = format_infotext(info)
    assert parse_infotext(text) == info
    # And through a PNG file, as PNG Info would read it.
    png = png_bytes(Image.new("RGB", (8, 8), (10, 20, 30)), text)
    assert parse_infotext(read_parameters(png)) == info


def test_format_matches_a1111_layout():
    text = format_infotext(InfoText("a cat", "dog", 30, "DPM++ 2M Karras", 7.0, 5, 512, 512, "v1-5", "abcdef0123"))
    assert text == (
        "a cat\nNegative prompt: dog\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512, Model hash: abcdef0123, Model: v1-5"
    )
    # No negative prompt: A1111 leaves the line out.
    assert "Negative prompt" not in format_infotext(InfoText("a cat", "", 30, "Euler", 7.0, 5, 512, 512))


def test_parse_without_parameters_line_keeps_prompt():
    assert parse_infotext("just a prompt, with commas") == InfoText(prompt="just a prompt, with commas")
    assert parse_infotext("") == InfoText()


def test_other_schedules_are_kept():
    info = parse_infotext("p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 5, Seed: 1")
    assert info.sampler == "DPM++ 2M" and info.extra == {"Schedule type": "Exponential"}


def test_exif_user_comment_in_jpeg_and_webp():
    text = "a dog, full body\nSteps: 10, Sampler: Euler, CFG scale: 7, Seed: 9, Size: 8x8"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")  # what A1111 (piexif) writes
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt, exif=exif.tobytes())
        info = parse_infotext(read_parameters(buf.getvalue()))
        assert (info.prompt, info.seed, info.sampler) == ("a dog, full body", 9, "Euler")
    assert read_parameters(b"not an image") == ""


def test_exif_comments_that_are_not_generation_parameters_are_ignored():
    # Press photos carry copyright lines in UserComment; they are not prompts.
    for text in ("(c)Glenn Francis 858-717-0010", "Screenshot"):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00" + text.encode("ascii")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", exif=exif.tobytes())
        assert read_parameters(buf.getvalue()) == ""


def test_a_long_line_without_pairs_parses_in_linear_time():
    # A1111's findall pattern took 0.20 s at 4,000 characters, 2.1 s at 16,000 (quadratic); a
    # 40,000-character PNG held a build worker for tens of seconds. Linear: 16,000 takes ~8 ms
    # and the 64 KiB limit ~30 ms on one shared core; 0.5 s leaves room for a loaded CI machine.
    import time

    for text in ("a" * 16_000, "a b" * 21_000, 'k: "\\", ' * 7_000, " \n" * 30_000 + "x", "Steps: 1\n" * 7_000):
        start = time.perf_counter()
        parse_infotext(text)
        assert time.perf_counter() - start < 0.5, text[:20]
    # The settings-line sniffer has no quadratic pattern either.
    from likeness.generate.infotext import looks_like_parameters

    start = time.perf_counter()
    assert not looks_like_parameters("\n" * 60_000 + " " * 60_000)
    assert time.perf_counter() - start < 0.5


def test_text_over_the_limit_is_refused_not_parsed():
    from likeness.errors import InvalidInput
    from likeness.generate.infotext import MAX_INFOTEXT_CHARS

    ok = "p" * (MAX_INFOTEXT_CHARS - 100) + "\nSteps: 3, Sampler: Euler, Seed: 4"
    assert parse_infotext(ok).seed == 4
    with pytest.raises(InvalidInput, match="over the 65,536-character limit"):
        parse_infotext("p" * (MAX_INFOTEXT_CHARS + 1))


@pytest.mark.parametrize("setting,needle", [
    ("Steps: inf", "Steps: 'inf'"),
    ("Steps: nan", "Steps: 'nan'"),
    ("Steps: 1e400", "Steps: '1e400'"),
    ("Steps: 99999999999", "Steps: '99999999999'"),
    ("Seed: " + "9" * 400, "Seed: '99999"),
    ("Seed: 18446744073709551616", "at most 18446744073709551615"),
    ("CFG scale: nan", "CFG scale: 'nan'"),
    ("CFG scale: -inf, Seed: 1", "CFG scale"),
    ("Size: 99999999999x512", "Size"),
], ids=["inf", "nan", "1e400", "steps-huge", "seed-400-digits", "seed-2**64", "cfg-nan", "cfg-minus-inf", "size-huge"])
def test_unusable_numbers_are_invalid_input_naming_the_value(setting, needle):
    # Was an uncaught OverflowError (int(float("inf"))): a CLI traceback, a build FAILED "internal error".
    from likeness.errors import InvalidInput

    with pytest.raises(InvalidInput) as exc:
        parse_infotext(f"a cat\n{setting}, Sampler: Euler, Model: m, Version: v")
    assert needle in str(exc.value) and "damaged" in str(exc.value)


def test_values_that_are_not_numbers_stay_unstated():
    info = parse_infotext("a cat\nSteps: many, Sampler: Euler, Seed: -1, CFG scale: -3, Size: big")
    assert (info.steps, info.seed, info.cfg_scale, info.width) == (0, -1, 0.0, 0)
    # Seeds beyond 2**32 (ComfyUI's range) are kept exactly, not through a float.
    assert parse_infotext("a\nSteps: 1, Sampler: Euler, Seed: 18446744073709551615").seed == 2**64 - 1
    assert parse_infotext("a\nSteps: 0030, Sampler: Euler, Seed: 1").steps == 30


@pytest.mark.parametrize("sampler,schedule,want", [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111 >= 1.9: DPM++ 2M's automatic schedule is Karras
    ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
    ("Euler a", "Automatic", "Euler a"),  # uniform for Euler a
    ("DPM++ 2M", "", "DPM++ 2M"),  # no Schedule type: an A1111 before 1.9, where DPM++ 2M was not Karras
])
def test_schedule_type_imports_as_the_sampler_a1111_ran(sampler: str, schedule: str, want: str) -> None:
    field = f", Schedule type: {schedule}" if schedule else ""
    info = parse_infotext(f"p\nSteps: 20, Sampler: {sampler}{field}, CFG scale: 5, Seed: 1")
    assert info.sampler == want
    if want != sampler:  # folded into the sampler name, not kept as an extra field
        assert "Schedule type" not in info.extra
