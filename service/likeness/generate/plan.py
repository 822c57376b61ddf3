"""The zoom x angle x per-cell plan of a gallery, with every seed fixed up front.

The plan is computed once per run and saved, so a resumed run makes exactly
the images it planned (same prompts, same seeds) and nothing twice.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from likeness.spec import CharacterSpec


@dataclass(frozen=True)
class PlannedImage:
    id: str
    zoom_index: int
    angle_index: int
    index_in_cell: int
    zoom: str
    angle: str
    prompt: str
    negative_prompt: str
    seed: int


def apply_prompt_sr(text: str, search: str, replace: str) -> str:
    """A1111 X/Y/Z "Prompt S/R": replace every occurrence of ``search``."""
    return text.replace(search, replace)


def cell_prompts(spec: CharacterSpec, zoom_index: int, angle_index: int) -> tuple[str, str]:
    """Prompt and negative prompt of one grid cell.

    With ``{zoom}``/``{angle}`` placeholders they are filled in; without them
    the zoom and angle lists are A1111 Prompt S/R lists: their first values
    (present in the template, checked by the spec) are replaced everywhere in
    the prompt and the negative prompt.
    """
    zoom, angle = spec.zooms[zoom_index], spec.angles[angle_index]
    fields = {
        "token": spec.token,
        "class_word": spec.class_word,
        "traits": ", ".join(spec.traits),
        "wardrobe": spec.wardrobe,
        "background": spec.background,
    }
    names = {n for _, n, _, _ in string.Formatter().parse(spec.template) if n}
    negative = spec.negative_prompt
    if "zoom" in names:
        prompt = spec.template.format(zoom=zoom, angle=angle, **fields)
    else:
        prompt = spec.template.format(**fields)
        for values, i in ((spec.zooms, zoom_index), (spec.angles, angle_index)):
            prompt = apply_prompt_sr(prompt, values[0], values[i])
            negative = apply_prompt_sr(negative, values[0], values[i])
    # Empty fields leave ", ," behind; A1111 users would tidy these by hand.
    prompt = ", ".join(p.strip() for p in prompt.split(",") if p.strip())
    return prompt, negative


def plan_gallery(spec: CharacterSpec, base_seed: int | None = None) -> list[PlannedImage]:
    """Every image of the gallery in generation order (cell by cell).

    Seeds are ``base_seed + i`` as in A1111 batches; ``base_seed`` comes from
    the spec, or is drawn once when the spec says -1 (the caller records it).
    """
    if base_seed is None:
        base_seed = spec.sampling.seed
    if base_seed < 0:
        base_seed = random.SystemRandom().randrange(0, 2**32 - 1 - spec.grid_size)
    plan = []
    i = 0
    for zi in range(len(spec.zooms)):
        for ai in range(len(spec.angles)):
            prompt, negative = cell_prompts(spec, zi, ai)
            for k in range(spec.per_cell):
                plan.append(
                    PlannedImage(
                        id=f"z{zi}-a{ai}-{k:04d}",
                        zoom_index=zi,
                        angle_index=ai,
                        index_in_cell=k,
                        zoom=spec.zooms[zi],
                        angle=spec.angles[ai],
                        prompt=prompt,
                        negative_prompt=negative,
                        seed=(base_seed + i) % 2**32,
                    )
                )
                i += 1
    return plan
