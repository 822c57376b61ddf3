"""Property-based tests of the parsers that read user and file input.

Each parser either returns its value or raises InvalidInput with a message;
nothing else escapes (the fuzzing that found OverflowError in the infotext and
learning-rate parsers and UnicodeDecodeError in specs ran 180 s; here each
property runs a few hundred examples so the whole file stays within seconds).
"""

from __future__ import annotations

import math
import re
import string

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from likeness.errors import InvalidInput
from likeness.generate.infotext import InfoText, format_infotext, param_pairs, parse_infotext
from likeness.prompts import parse_prompt_attention
from likeness.spec import load_spec, spec_from_dict
from likeness.train.lr_schedule import parse_learn_rate

# A few hundred examples per property: the whole file runs in a few seconds on one core.
FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=80, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Characters that matter to the infotext grammar, plus a few that do not.
_INFO_CHARS = st.sampled_from(list('aZ9_ -/:,"\\\t\n') + ["é", "²", "\u3000", "x"])
_A1111_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@FAST
@given(st.text(_INFO_CHARS, max_size=60).map(lambda s: s.replace("\n", " ")))
@example('Steps: 3, Lora hashes: "a: 1, b: 2", Seed: 4')
@example('k: "\\", k: "\\"')
@example('  Steps:   , x: ""')
def test_param_pairs_find_what_a1111s_pattern_finds(line):
    # The linear scanner must agree with A1111's own (quadratic) findall on every line.
    assert param_pairs(line) == _A1111_PARAM_RE.findall(line)


@FAST
@given(st.text(max_size=300) | st.text(_INFO_CHARS, max_size=300))
@example("a\nSteps: inf, Sampler: x, Seed: 1")
@example("a\nSteps: 1, Sampler: x, Seed: " + "9" * 5000)
@example("a\nSteps: 1, Sampler: x, CFG scale: 1e999")
def test_parse_infotext_returns_or_refuses(text):
    try:
        info = parse_infotext(text)
    except InvalidInput as exc:
        assert "infotext" in str(exc)
        return
    assert isinstance(info, InfoText)
    assert 0 <= info.steps and -1 <= info.seed <= 2**64 - 1 and math.isfinite(info.cfg_scale)


_PLAIN = st.text(string.ascii_letters + string.digits + " ()[]:.-_", min_size=1, max_size=40).map(str.strip).filter(
    lambda s: s and not s.startswith("Negative prompt:") and "Steps:" not in s
)


@FAST
@given(
    prompt=_PLAIN,
    negative=st.one_of(st.just(""), _PLAIN),
    steps=st.integers(1, 150),
    sampler=st.sampled_from(["Euler a", "DPM++ 2M Karras", "DDIM"]),
    cfg=st.floats(0.5, 30, allow_nan=False).map(lambda v: round(v, 2)),
    seed=st.integers(0, 2**64 - 1),
    size=st.tuples(st.integers(1, 4096), st.integers(1, 4096)),
    extra_value=st.text(string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""), max_size=30),
)
def test_format_then_parse_is_the_identity(prompt, negative, steps, sampler, cfg, seed, size, extra_value):
    extra = {"Note": extra_value.strip()} if extra_value.strip() else {}
    info = InfoText(prompt, negative, steps, sampler, cfg, seed, size[0], size[1], "model", "abc123", extra)
    assert parse_infotext(format_infotext(info)) == info


@FAST
@given(st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(list("0123456789.:,-+e ") + ["inf", "nan", "1e400", "9" * 30]), max_size=20).map("".join),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
))
@example(10**400)
@example("0.005:" + "9" * 5000)
@example("0" * 23 + "\x1f" * 8 + "\x08\U00010b92\U00011daa\U0001342f\U00018d09\U0002ebe10000")
def test_parse_learn_rate_returns_or_refuses(value):
    try:
        schedule = parse_learn_rate(value)
    except InvalidInput as exc:
        assert str(exc).startswith("learning rate") and len(str(exc)) < 400
        return
    for rate, end in schedule.pieces:
        assert math.isfinite(rate) and rate > 0 and (end == -1 or 1 <= end <= 10**9)
    assert schedule.stop_step(100) <= 100


@FAST
@given(st.lists(st.tuples(st.floats(1e-6, 1.0), st.integers(1, 10**6)), min_size=1, max_size=5, unique_by=lambda p: p[1]),
       st.booleans())
def test_a_valid_schedule_parses_to_its_pieces(pairs, open_end):
    pairs = sorted(pairs, key=lambda p: p[1])
    text = ", ".join(f"{r!r}:{e}" for r, e in pairs) + (", 1e-5" if open_end else "")
    schedule = parse_learn_rate(text)
    assert schedule.pieces == tuple(pairs) + (((1e-5, -1),) if open_end else ())
    last = pairs[-1][1]
    assert schedule.stop_step(last + 10) == (last + 10 if open_end else last)


@SLOWER
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8")))
@example('name = "Zoé"\ntoken = "z03"\n'.encode("latin-1"))
@example(b'name = "E"\ntoken = "3m1ly"\nper_cell = 99999999999999999999999\n')
@example(b'name = "E"\ntoken = "3m1ly"\n[sampling]\ncfg_scale = nan\n')
@example(b'name = "E"\ntoken = "3m1ly"\ntemplate = "{traits[0]} {zoom.__class__} {angle}"\n')
def test_load_spec_returns_or_refuses(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("spec") / "s.toml"
    path.write_bytes(data)
    try:
        load_spec(path)
    except InvalidInput as exc:
        assert "s.toml" in str(exc)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = st.sampled_from(["name", "token", "class_word", "traits", "template", "zooms", "angles", "per_cell",
                           "sampling", "profile", "negative_prompt", "unknown"])


@FAST
@given(st.dictionaries(_FIELDS, _VALUES, max_size=6),
       st.dictionaries(st.sampled_from(["steps", "cfg_scale", "width", "seed", "sampler", "batch_size"]), _VALUES,
                       max_size=3))
def test_spec_from_dict_returns_or_refuses(fields, sampling):
    data = {"name": "E", "token": "3m1ly", **fields}
    if sampling:
        data["sampling"] = sampling
    try:
        spec = spec_from_dict(data)
    except InvalidInput as exc:
        assert str(exc).startswith("spec")
        return
    assert spec.token and 1 <= spec.per_cell <= 1000


_PROMPT_CHARS = st.sampled_from(list("ab ,()[]:\\.0123456789-+e") + ["BREAK", "inf", "1e39", "1e999", "é"])


@FAST
@given(st.lists(_PROMPT_CHARS, max_size=30).map("".join) | st.text(max_size=60))
@example("(cat:1e39)")
@example("((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((cat")
def test_parse_prompt_attention_returns_or_refuses(text):
    try:
        pieces = parse_prompt_attention(text)
    except InvalidInput as exc:
        assert "weight" in str(exc)
        return
    assert pieces and all(isinstance(t, str) and isinstance(w, float) for t, w in pieces)


@FAST
@given(st.text(string.ascii_letters + " ,.", max_size=60).filter(lambda t: not re.search(r"\bBREAK\b", t)))
def test_prompt_text_without_syntax_is_one_unweighted_fragment(text):
    assert parse_prompt_attention(text) == [(text, 1.0)]


@FAST
@given(st.lists(st.sampled_from(["a", " ", "(", ")", "[", "]", ":", "9" * 20, "1.5", "0", "-2", "cat"]),
                max_size=60).map("".join))
@example("(cat:" + "9" * 40 + ")")
@example("(" * 60 + "cat")
def test_prompt_weights_are_finite_and_bounded_or_refused(text):
    from likeness.prompts import MAX_ATTENTION_WEIGHT

    try:
        pieces = parse_prompt_attention(text)
    except InvalidInput as exc:
        assert "weight" in str(exc) and f"at most {MAX_ATTENTION_WEIGHT:g}" in str(exc)
        return
    assert all(math.isfinite(w) and abs(w) <= MAX_ATTENTION_WEIGHT for _, w in pieces)
