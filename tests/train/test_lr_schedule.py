"""The A1111 learning-rate schedule: parsing, step boundaries, and agreement with A1111's own stepping."""

from __future__ import annotations

import pytest

from likeness.errors import InvalidInput
from likeness.train.lr_schedule import parse_learn_rate


class _A1111Schedule:
    """A transcription of A1111's LearnScheduleIterator + LearnRateScheduler (learn_schedule.py).

    Drives an "optimizer" the way modules/textual_inversion/textual_inversion.py
    does: ``apply(optimizer, embedding.step)`` before each update, where
    ``embedding.step`` counts updates already done; ``finished`` ends training.
    """

    def __init__(self, learn_rate: str, max_steps: int, cur_step: int = 0) -> None:
        rates = []
        for pair in learn_rate.split(","):
            if not pair.strip():
                continue
            tmp = pair.split(":")
            if len(tmp) == 2:
                step = int(tmp[1])
                if step > cur_step:
                    rates.append((float(tmp[0]), min(step, max_steps)))
                    if step > max_steps:
                        break
                elif step == -1:
                    rates.append((float(tmp[0]), max_steps))
                    break
            else:
                rates.append((float(tmp[0]), max_steps))
                break
        assert rates
        self._it = iter(rates)
        self.learn_rate, self.end_step = next(self._it)
        self.finished = False

    def apply(self, step_number: int) -> None:
        if step_number < self.end_step:
            return
        try:
            self.learn_rate, self.end_step = next(self._it)
        except StopIteration:
            self.finished = True


def _a1111_rates(text: str, max_steps: int) -> list[float]:
    """Rates of updates 1, 2, ... as A1111's training loop applies them, until it finishes."""
    sched, done, out = _A1111Schedule(text, max_steps), 0, []
    while True:
        sched.apply(done)
        if sched.finished or done >= max_steps:
            return out
        out.append(sched.learn_rate)
        done += 1


def _ours(text: str, max_steps: int) -> list[float]:
    s = parse_learn_rate(text)
    return [s.rate_at(k) for k in range(1, s.stop_step(max_steps) + 1)]


def test_example_boundaries():
    s = parse_learn_rate("0.005:100, 1e-3:1000, 1e-5")
    assert s.rate_at(1) == 0.005
    assert s.rate_at(100) == 0.005  # the rate applies while step <= its end step
    assert s.rate_at(101) == 1e-3
    assert s.rate_at(1000) == 1e-3
    assert s.rate_at(1001) == 1e-5
    assert s.rate_at(10**6) == 1e-5
    assert s.stop_step(3000) == 3000
    assert s.describe(1500) == [
        {"rate": 0.005, "first": 1, "last": 100},
        {"rate": 1e-3, "first": 101, "last": 1000},
        {"rate": 1e-5, "first": 1001, "last": 1500},
    ]


@pytest.mark.parametrize(
    "text,max_steps",
    [
        ("0.005:100, 1e-3:1000, 1e-5", 1200),
        ("0.005:100, 1e-3:1000, 1e-5", 50),
        ("0.005:10, 1e-3:20", 40),  # schedule ends first: training stops at 20
        ("0.005:10, 1e-3:20", 15),  # cut to max_steps
        ("0.1:3,0.2:5,0.3:-1", 9),
        ("0.05", 7),
        (" 0.01 : 4 ,  0.001 ", 8),
        ("1e-2:1", 5),
    ],
)
def test_steps_like_a1111(text, max_steps):
    assert _ours(text, max_steps) == _a1111_rates(text, max_steps)


def test_number_and_numeric_string_are_constant():
    for v in (0.005, "0.005", 5e-3):
        s = parse_learn_rate(v)
        assert s.pieces == ((0.005, -1),)
        assert s.stop_step(77) == 77
    assert parse_learn_rate(1).rate_at(5) == 1.0


def test_schedule_end_stops_training():
    s = parse_learn_rate("0.005:100")
    assert s.stop_step(500) == 100
    assert s.stop_step(40) == 40


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("", "empty"),
        ("abc", "not a number"),
        ("0.005:abc", "whole number"),
        ("0.005:10.5", "whole number"),
        ("0.005:0", "1 or more"),
        ("0.005:-5", "1 or more"),
        ("-0.1", "positive"),
        ("nan", "positive"),
        ("0.005:100, 0.001:50", "after the previous"),
        ("0.005, 0.001:50", "last entry"),
        ("0.005:-1, 0.001", "last entry"),
        ("0.005:1:2", "rate:end_step"),
    ],
)
def test_invalid_strings_say_how_to_fix(bad, needle):
    with pytest.raises(InvalidInput) as exc:
        parse_learn_rate(bad)
    assert needle in str(exc.value)
    if needle not in ("positive", "1 or more", "whole number"):
        assert "0.005:100" in str(exc.value)  # the message shows a correct example


def test_steps_are_one_based():
    with pytest.raises(ValueError):
        parse_learn_rate("0.1").rate_at(0)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (10**400, "too large"),
        (2**1024, "too large"),
        (float("inf"), "'inf'"),
        ("1e400", "'1e400'"),
        ("0.005:" + "9" * 5000, "(5,000 characters) is too large"),
        ("0.005:99999999999999999999", "'99999999999999999999' is too large"),
        ("0.005:1000000001", "end step 1000000001 is too large"),
    ],
    ids=["int-10**400", "int-2**1024", "float-inf", "str-1e400", "end-5000-digits", "end-20-digits", "end-over-1e9"],
)
def test_huge_numbers_are_invalid_input_naming_the_value(bad, needle):
    # 10**400 raised OverflowError (float(int)); a 5,000-digit end step was echoed whole.
    with pytest.raises(InvalidInput) as exc:
        parse_learn_rate(bad)
    assert needle in str(exc.value)
    assert len(str(exc.value)) < 300


def test_the_largest_end_step_is_accepted():
    from likeness.train.lr_schedule import MAX_END_STEP

    assert parse_learn_rate(f"0.005:{MAX_END_STEP}").stop_step(10) == 10
