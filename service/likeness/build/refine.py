"""The refinement loop's stop rule (a pure function returning a reason) and its recorded stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from likeness.build.context import BuildContext, StageFn
from likeness.errors import InvalidInput

@dataclass(frozen=True)
class RefineDecision:
    """What the refinement loop does after a round's curation (see :func:`refine_decision`)."""

    # The round whose embedding is exported, evaluated and reported (so far).
    best_round: int
    # Stop refining after this round.
    stop: bool
    # The latest round is the new best, so its curated set must be captioned and trained.
    train: bool
    # Identity consistency gained over the best earlier round (None: the round found no identity).
    gain: float | None
    # One sentence for the build's events: what was measured and what happens next.
    reason: str


def refine_decision(consistency: Sequence[float | None], margin: float, max_rounds: int) -> RefineDecision:
    """The stop rule of the refinement loop, on identity consistencies alone.

    ``consistency[r]`` is round r's curated-set identity consistency (None when
    curation found no identity: no face passed its checks). Round 0 always
    counts. The latest round (``len - 1``) is compared with the best earlier
    round: it becomes the best if it is better at all; refining stops when it
    found no identity, gained less than ``margin``, or is round ``max_rounds``.
    Ties keep the earlier round (its embedding already exists).
    """
    if not consistency or consistency[0] is None:
        raise InvalidInput("refine_decision: round 0 needs an identity consistency")
    r = len(consistency) - 1
    if r == 0:
        stop = max_rounds <= 0
        return RefineDecision(0, stop, True, None,
                              "no refinement rounds asked for" if stop else "round 0 done; refining")
    earlier = [(c, -i) for i, c in enumerate(consistency[:r]) if c is not None]
    best_c, neg_best = max(earlier)
    prev_best = -neg_best
    c = consistency[r]
    if c is None:
        return RefineDecision(prev_best, True, False, None,
                              f"refining stopped at round {r}: its curation found no identity (no face passed "
                              f"the checks); keeping round {prev_best} (identity consistency {best_c:.3f})")
    gain = float(c) - float(best_c)
    best = r if gain > 0 else prev_best
    head = (f"round {r}: identity consistency {c:.3f}, {gain:+.3f} vs round {prev_best}")
    if gain <= 0 or gain < margin:
        reason = f"{head}, less than the margin {margin:.3f}: refining stopped; keeping round {best}"
        return RefineDecision(best, True, best == r, gain, reason)
    if r >= max_rounds:
        reason = f"{head}: reached the {max_rounds} refinement round(s) asked for; keeping round {best}"
        return RefineDecision(best, True, True, gain, reason)
    return RefineDecision(best, False, True, gain, f"{head} (margin {margin:.3f}): refining again")


def round_consistency(ctx: BuildContext, round_: int) -> float | None:
    """Round ``round_``'s curated identity consistency; None when curation kept no face or warned
    that the gallery holds no one consistent character."""
    res = ctx.result(round_, "curate")
    scores = res.get("scores", {})
    if res.get("warnings") or ("selected" in res and (not res["selected"] or not scores.get("n_faces", 1))):
        return None
    return float(scores.get("identity_consistency") or 0.0)


def refine_stage(decision: RefineDecision, consistency: float | None) -> StageFn:
    def refine(ctx: BuildContext, round_: int) -> dict[str, Any]:
        scores = {"best_round": float(decision.best_round)}
        if consistency is not None:
            scores["identity_consistency"] = consistency
        if decision.gain is not None:
            scores["gain"] = decision.gain
        return {"best_round": decision.best_round, "stop": decision.stop, "trained": decision.train,
                "gain": decision.gain, "reason": decision.reason, "message": decision.reason, "scores": scores}
    return refine
