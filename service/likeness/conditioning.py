"""Per-call text conditioning of a denoising batch: what :func:`likeness.prompts.encode_prompts` returns.

A1111 prompt editing and alternation (:mod:`likeness.prompt_schedule`) change a prompt's text
from one model call to the next. Each distinct text is encoded once into a table; every image
names, per call, the table rows of its prompt and negative prompt. As a mapping the object is the
first call's diffusers kwargs, so static prompts are used exactly as before (``pipe(**cond)``).
torch is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from likeness.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Conditioning"]


class Conditioning(Mapping[str, "torch.Tensor"]):
    """What :func:`encode_prompts` returns: the text conditioning of every model call of a batch.

    As a mapping it is the diffusers kwargs of the first call (``prompt_embeds``,
    ``negative_prompt_embeds`` and, for SDXL, the pooled pair), so ``pipe(**cond)`` works;
    :meth:`at` gives call ``i``'s kwargs when a prompt uses A1111 prompt editing or alternation.
    Each distinct text is encoded once (``table``); images index rows of it per call.
    """

    def __init__(self, table: dict[str, "torch.Tensor"], calls: Sequence[Sequence[tuple[int, int]]],
                 steps: int | None, sdxl: bool) -> None:
        # "embeds" [N, 77*chunks, D] (and "pooled" [N, P] for SDXL): one row per distinct prompt text;
        # "neg_embeds" (and "neg_pooled") the same for negative prompts, which may have another length.
        self.table = table
        # Per image, per model call (one entry when its prompts are static): (prompt row, negative row).
        self.calls = tuple(tuple(c) for c in calls)
        # A1111's total steps the schedule was made for (None: built without steps, nothing scheduled).
        self.steps = steps
        self.sdxl = sdxl
        self._first = self.at(0)

    @property
    def scheduled(self) -> bool:
        """True when some image's conditioning changes between model calls."""
        return any(len(set(c)) > 1 for c in self.calls)

    def rows_at(self, call: int) -> tuple[tuple[int, int], ...]:
        return tuple(c[min(call, len(c) - 1)] for c in self.calls)

    def at(self, call: int) -> dict[str, "torch.Tensor"]:
        """diffusers kwargs for model call ``call`` (0-based; past the schedule's end, its last entry)."""
        rows = self.rows_at(call)
        pos = [r[0] for r in rows]
        neg = [r[1] for r in rows]
        t = self.table
        out = {"prompt_embeds": t["embeds"][pos], "negative_prompt_embeds": t["neg_embeds"][neg]}
        if self.sdxl:
            out["pooled_prompt_embeds"] = t["pooled"][pos]
            out["negative_pooled_prompt_embeds"] = t["neg_pooled"][neg]
        return out

    @property
    def padded(self) -> bool:
        """True when prompt and negative prompt have one sequence length (one UNet batch)."""
        return self.table["embeds"].shape[1] == self.table["neg_embeds"].shape[1]

    def select(self, index: int) -> "Conditioning":
        """Image ``index`` alone (sharing the encoded table)."""
        return Conditioning(self.table, [self.calls[index]], self.steps, self.sdxl)

    @staticmethod
    def concat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """One batch from several (equal sequence length and step count), tables merged."""
        import torch

        if not parts:
            raise InvalidInput("Conditioning.concat needs at least one part")
        shapes = {(p.steps, p.table["embeds"].shape[1:], p.table["neg_embeds"].shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise InvalidInput("conditionings of different step counts or chunk counts cannot share a batch")
        keys = parts[0].table.keys()
        table = {k: torch.cat([p.table[k] for p in parts]) for k in keys}
        calls: list[tuple[tuple[int, int], ...]] = []
        pos_offset = neg_offset = 0
        for p in parts:
            calls += [tuple((a + pos_offset, b + neg_offset) for a, b in c) for c in p.calls]
            pos_offset += p.table["embeds"].shape[0]
            neg_offset += p.table["neg_embeds"].shape[0]
        return Conditioning(table, calls, parts[0].steps, parts[0].sdxl)

    def __getitem__(self, key: str) -> "torch.Tensor":
        return self._first[key]

    def __iter__(self) -> Any:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)
