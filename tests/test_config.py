"""Bounded options: one home for each default and bound, checked wherever the option is read."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from likeness.config import SEED_MAX, bounded, check_bounds, check_seed, field_bounds, from_dict, same_as
from likeness.errors import InvalidInput


@dataclass(frozen=True)
class _Cfg:
    steps: int = bounded(0, 0, 10, zero_means="the spec's")
    rate: float = bounded(0.5, 0.0, 1.0)


@dataclass(frozen=True)
class _Other:
    steps: int = same_as(_Cfg, "steps")


@pytest.mark.parametrize("data, field, hint", [
    ({"steps": 11}, "steps", "0 (the spec's) or 1 to 10"),
    ({"steps": -1}, "steps", "0 (the spec's) or 1 to 10"),
    ({"rate": 1.5}, "rate", "0.0 to 1.0"),
], ids=["above", "below", "float"])
def test_from_dict_checks_declared_bounds(data, field, hint):
    with pytest.raises(InvalidInput, match=rf"cfg\.{field}: .* out of range; use {re.escape(hint)}"):
        from_dict(_Cfg, data, "cfg")


def test_same_as_shares_default_and_bound():
    assert _Other().steps == 0 and field_bounds(_Other, "steps") == (0, 10)
    with pytest.raises(InvalidInput, match="steps"):
        from_dict(_Other, {"steps": 99})
    check_bounds(_Other(steps=10))  # the bound is inclusive


@pytest.mark.parametrize("seed, random_ok, ok", [
    (-1, True, True), (-1, False, False), (0, False, True), (SEED_MAX, False, True),
    (SEED_MAX + 1, True, False), (True, True, False), (-2, True, False),
], ids=["random", "random-refused", "zero", "max", "too-big", "bool", "minus-two"])
def test_check_seed(seed, random_ok, ok):
    if ok:
        assert check_seed(seed, "s", random_ok=random_ok) == seed
    else:
        with pytest.raises(InvalidInput, match="not a valid seed"):
            check_seed(seed, "s", random_ok=random_ok)


def test_k_has_one_default_and_one_bound_everywhere():
    from likeness.build.options import BuildOptions, build_options
    from likeness.curate.checks import CurateConfig, validate_config
    from likeness.nightly import NightlyConfig

    assert CurateConfig().k == BuildOptions().k == NightlyConfig().k == 25
    assert field_bounds(CurateConfig, "k") == field_bounds(BuildOptions, "k") == field_bounds(NightlyConfig, "k")
    lo, hi = field_bounds(CurateConfig, "k")
    for bad in (lo - 1, hi + 1):
        with pytest.raises(InvalidInput, match=r"options\.k"):
            build_options({"k": bad})
        with pytest.raises(InvalidInput, match=r"curate\.k"):
            validate_config(CurateConfig(k=bad))
    assert build_options({"k": hi}).k == hi


def test_every_seed_check_uses_the_same_range():
    from likeness.build.options import build_options
    with pytest.raises(InvalidInput, match=r"options\.base_seed"):
        build_options({"base_seed": SEED_MAX + 1})
    assert build_options({"base_seed": SEED_MAX}).base_seed == SEED_MAX
    from likeness.evaluate import EvalConfig, _check

    with pytest.raises(InvalidInput, match=r"evaluate\.seeds"):
        _check(EvalConfig(seeds=(SEED_MAX + 1,)))


def test_markers_follow_the_fixtures_a_test_uses(request, realdata):
    # conftest sets them from the fixture closure: a test on real photos is a realdata test.
    assert request.node.get_closest_marker("realdata") is not None
    assert request.node.get_closest_marker("ray") is None
