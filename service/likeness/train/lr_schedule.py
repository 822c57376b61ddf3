"""Learning rates as A1111 writes them: a number, or ``"0.005:100, 1e-3:1000, 1e-5"``.

Semantics (AUTOMATIC1111 ``modules/textual_inversion/learn_schedule.py``):
each ``rate:end`` pair applies to training steps ``1..end`` not covered by an
earlier pair (A1111's ``LearnRateScheduler`` keeps a rate while the number of
steps already done is ``< end``, i.e. while the 1-based step is ``<= end``); a
bare rate, or ``rate:-1``, runs to the last step. If the last pair has an end
step, training *stops* there (A1111 finishes when its schedule runs out), so
``"0.005:100"`` with ``--steps 500`` trains 100 steps. End steps beyond the
requested number of steps are cut to it.

A1111 silently ignores some malformed input (entries after a bare rate, end
steps that go backwards); here those are errors that say how to fix them.
The schedule is a pure function of the step, so a resumed run gets exactly
the rates an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from likeness.errors import InvalidInput

_EXAMPLE = '"0.005:100, 1e-3:1000, 1e-5" (0.005 for steps 1-100, 1e-3 up to step 1000, 1e-5 after)'


@dataclass(frozen=True)
class LearnRateSchedule:
    """A parsed schedule: ``(rate, end_step)`` pieces; ``end_step = -1`` runs to the end."""

    # The pieces in order; end steps strictly increase, only the last may be -1.
    pieces: tuple[tuple[float, int], ...]
    # The text it was parsed from (stored in checkpoints and reports).
    text: str

    def rate_at(self, step: int) -> float:
        """The rate of 1-based training step ``step`` (the optimizer update that makes ``step`` steps done)."""
        if step < 1:
            raise ValueError(f"training steps are 1-based, got {step}")
        for rate, end in self.pieces:
            if end == -1 or step <= end:
                return rate
        return self.pieces[-1][0]

    def stop_step(self, max_steps: int) -> int:
        """The last step that trains: ``max_steps``, or earlier when the schedule ends first."""
        rate, end = self.pieces[-1]
        return max_steps if end == -1 else min(end, max_steps)

    def describe(self, max_steps: int) -> list[dict[str, float | int]]:
        """``[{"rate", "first", "last"}]`` spans within ``1..stop_step(max_steps)`` (for logs and docs)."""
        out: list[dict[str, float | int]] = []
        first, stop = 1, self.stop_step(max_steps)
        for rate, end in self.pieces:
            last = stop if end == -1 else min(end, stop)
            if first <= last:
                out.append({"rate": rate, "first": first, "last": last})
            first = last + 1
        return out


# No run trains a billion steps (a build allows 100,000): an end step past this is a typo, and
# refusing it keeps every step number an int64 in checkpoints, reports and protobuf messages.
MAX_END_STEP = 10**9


def _show(text: str) -> str:
    """``text`` quoted for a message, at most ~60 characters (a 5,000-digit number is not echoed).

    The cut is on the quoted form: escapes (``\\U00010b92``) make it up to 10x longer than the text.
    """
    quoted = repr(text)
    if len(text) <= 40 and len(quoted) <= 60:
        return quoted
    head = repr(text[:37])
    if len(head) > 56:
        head = head[:55] + head[0]
    return f"{head[:-1]}...{head[-1]} ({len(text):,} characters)"


def _label(where: str) -> str:
    return f"learning rate {where}" if where else "learning rate"


def _rate(text: str, where: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise InvalidInput(f"{_label(where)}: {_show(text)} is not a number; write e.g. {_EXAMPLE}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise InvalidInput(f"{_label(where)}: {_show(text)} must be a positive finite number such as 0.005")
    return rate


def parse_learn_rate(value: float | int | str) -> LearnRateSchedule:
    """Parse a number or an A1111 schedule string; bad input raises InvalidInput with the fix."""
    if isinstance(value, bool):
        raise InvalidInput(f"learning rate: expected a number or a schedule string, got {value!r}; write e.g. {_EXAMPLE}")
    if isinstance(value, (int, float)):
        try:
            text = repr(float(value))
        except OverflowError:  # an int beyond float range (10**400)
            raise InvalidInput(f"learning rate: {_show(str(value))} is too large; "
                               "write a positive number such as 0.005") from None
        return LearnRateSchedule(((_rate(text, ""), -1),), text)
    if not isinstance(value, str):
        raise InvalidInput(f"learning rate: expected a number or a schedule string, got {type(value).__name__}")
    text = value.strip()
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise InvalidInput(f"learning rate: empty; write a number such as 0.005 or a schedule such as {_EXAMPLE}")
    pieces: list[tuple[float, int]] = []
    for i, entry in enumerate(entries):
        where = f"entry {i + 1} ({_show(entry)})"
        if pieces and pieces[-1][1] == -1:
            raise InvalidInput(
                f"learning rate {where}: comes after a rate that already runs to the end; "
                f"a rate without an end step (or with :-1) must be the last entry, as in {_EXAMPLE}"
            )
        parts = entry.split(":")
        if len(parts) == 1:
            pieces.append((_rate(parts[0].strip(), where), -1))
            continue
        if len(parts) != 2:
            raise InvalidInput(f"learning rate {where}: use rate:end_step pairs separated by commas, as in {_EXAMPLE}")
        rate = _rate(parts[0].strip(), where)
        end_text = parts[1].strip()
        # Length first: int() of a 5,000-digit string is refused by Python itself (and slow).
        if len(end_text.lstrip("+-0")) > len(str(MAX_END_STEP)):
            raise InvalidInput(f"learning rate {where}: end step {_show(end_text)} is too large; "
                               f"end steps are at most {MAX_END_STEP:,} (or -1 for the end)")
        try:
            end = int(end_text)
        except ValueError:
            raise InvalidInput(
                f"learning rate {where}: end step {_show(end_text)} must be a whole number (or -1 for the end)"
            ) from None
        if end == 0 or end < -1:
            raise InvalidInput(f"learning rate {where}: end step {end} must be 1 or more (or -1 for the end)")
        if end > MAX_END_STEP:
            raise InvalidInput(f"learning rate {where}: end step {end} is too large; "
                               f"end steps are at most {MAX_END_STEP:,} (or -1 for the end)")
        if end != -1 and pieces and end <= pieces[-1][1]:
            raise InvalidInput(
                f"learning rate {where}: end step {end} must be after the previous one ({pieces[-1][1]}); "
                f"steps increase left to right, as in {_EXAMPLE}"
            )
        pieces.append((rate, end))
    return LearnRateSchedule(tuple(pieces), text)
