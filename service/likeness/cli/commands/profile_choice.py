"""The model profile of a command, chosen aloud.

Not a command module (not in ``likeness.cli.main.COMMAND_MODULES``). Every command
that loads models resolves its profile here, so none falls back silently: an
automatic choice is said on stderr, and a choice of tiny random weights (``cpu-tiny``
on a machine without a GPU) is a warning that ``-q`` keeps, because a script that
asked for quiet still gets noise instead of pictures (issue 13: `generate` fell back
to cpu-tiny without a word).
"""

from __future__ import annotations

from typing import Any, Literal

from likeness.cli.output import say, warn


def resolve_cli_profile(explicit: Any = None, spec_profile: str = "", *,
                        uses: Literal["diffusion", "clip", "face pack"] = "diffusion") -> Any:
    """:func:`likeness.profiles.resolve_profile`, saying an automatic choice.

    ``uses``: what the command takes from the profile. ``"diffusion"`` (generate, train,
    build): the profile's own sentence (its images are noise). ``"clip"`` (curate,
    caption): its face pack is real; only its CLIP has random weights. ``"face pack"``
    (curate --no-clip): real weights only, so the choice is said, not warned.
    """
    from likeness.profiles import resolve_profile

    why: list[Any] = []  # the ChoiceSentence of an automatic choice
    prof = resolve_profile(explicit or None, spec_profile, say=why.append)
    if not why:  # named by the user or the spec: nothing was chosen for them
        return prof
    if not prof.random_weights:
        say(why[0])
    elif uses == "face pack":  # only its face models, real in every profile: nothing random is used
        say(f"using profile {prof.name!r} for its face pack ({why[0].reason})")
    elif uses == "clip":
        warn(f"warning: using profile {prof.name!r} because {why[0].reason}: its face pack is real, but its CLIP has "
             "tiny random weights, so no CLIP evidence (background, rear views, tags) is used; "
             "pass --profile to choose")
    else:
        warn(f"warning: {why[0]}; pass --profile to choose")
    return prof
