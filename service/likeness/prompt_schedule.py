"""A1111 prompt editing and alternation: the prompt text of every denoising step.

A1111 reads a prompt in two passes. This module is the first one (the second,
attention weights and chunks, is :mod:`likeness.prompts`):

* ``[from:to:when]`` (prompt editing) is ``from`` up to step ``when`` and ``to``
  after it; ``[to:when]`` adds ``to`` after ``when``; ``[from::when]`` removes
  ``from`` after it. A ``when`` written with a decimal point is a fraction of
  the steps (``0.5``, ``.25``; the step is ``int(when * steps)``), one without
  is a step number (``10``; ``1`` is step 1, not the whole run); either is
  capped at ``steps``, and one below 1 means ``to`` from the start.
* ``[a|b|c]`` (alternation) cycles ``a``, ``b``, ``c``, ``a``, ... step by step;
  an empty option is an empty string.
* Both nest (``a[b:[c:d:2]:1]e``) and may sit inside attention brackets, which
  are kept as written for the second pass: ``[(a:2):3]`` is ``(a:2)`` after step 3.
  Whitespace around ``when`` is dropped, elsewhere it is kept.
* A prompt A1111's grammar cannot read (a ``|`` outside brackets, a lone
  trailing backslash, brackets it cannot match inside a construct) is used
  literally, whole, for every step, as A1111 does; stray brackets and colons at
  the top level are literal text.

Steps: :func:`prompt_schedule` gives A1111's schedule, ``[(end_at_step, text)]``
(its ``get_learned_conditioning_prompt_schedules``). A1111's denoiser counts
its model calls from 0 and at call ``i`` uses the first entry with
``i <= end_at_step``, so ``a [cat:dog:0.5] photo`` at 20 steps is ``a cat photo``
for calls 0-10 (the first 11 steps) and ``a dog photo`` for calls 11-19;
:func:`texts_per_call` gives that list directly. Samplers that call the model
twice per step (Heun, DPM2, DPM++ SDE) are scheduled over twice the steps, as
A1111 does (``steps`` here is A1111's "total steps").

Syntax Likeness does not implement is refused instead of being encoded as
literal characters: ``AND`` (composable prompts) and extra-network tags
(``<lora:name:0.8>``, ``<hypernet:name:1>``). ComfyUI's ``embedding:name``
becomes the embedding's trigger word ``name`` (:func:`check_prompt`).

The rules were learned from A1111's documentation and the examples in its
prompt parser; this parser is written for Likeness (recursive descent, no lark).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

from likeness.errors import InvalidInput

# A1111 splits composable prompts on the whole upper-case word AND (positive prompts only).
_AND_RE = re.compile(r"\bAND\b")
# A1111's extra-network tag: <type:name[:weights]> (lora, lyco, hypernet, ...).
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
# ComfyUI's embedding reference: "embedding:" then the file name (a word; commas and brackets end it).
_COMFY_EMBEDDING_RE = re.compile(r"(?<![\w:])embedding:([^\s,()\[\]|<>:]+)")
_EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
# lark's SIGNED_NUMBER, the token A1111's grammar reads as `when`.
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
# Characters that end a plain-text run (A1111's `plain` excludes them; a backslash escapes one).
_SPECIAL = set("[]():|")
# Brackets nested deeper than this are read as literal text: Python's recursion limit is ~1000
# frames and each level here costs three; no real prompt nests more than a handful.
MAX_DEPTH = 100
# Prompts longer than this are refused (A1111 has no limit, but 75-token chunks of a 20,000
# character prompt would be ~60 chunks; nobody writes that, and it bounds parse time).
MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class _Scheduled:
    before: "_Seq | None"
    after: "_Seq"
    when: str


@dataclass(frozen=True)
class _Alternate:
    options: "tuple[_Seq, ...]"


_Node = Union[str, _Scheduled, _Alternate, "_Group"]


@dataclass(frozen=True)
class _Group:
    """Attention brackets ``( ... )``, ``( ... : ... )``, ``[ ... ]``: kept as written."""

    parts: "tuple[_Node, ...]"


_Seq = tuple  # a tuple of nodes


class _Fail(Exception):
    """The grammar does not match here."""


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)

    def plain(self, i: int) -> tuple[str, int]:
        j = i
        while j < self.n:
            c = self.s[j]
            if c == "\\":
                if j + 1 >= self.n:
                    raise _Fail  # a lone trailing backslash: A1111's grammar fails on the prompt
                j += 2
            elif c in _SPECIAL:
                break
            else:
                j += 1
        return self.s[i:j], j

    def prompt(self, i: int, depth: int) -> tuple[tuple[_Node, ...], int]:
        """A run of plain text, groups, schedules and alternations, up to a character it cannot take."""
        if depth > MAX_DEPTH:
            raise _Fail  # read as literal brackets, like any bracket the grammar cannot match
        out: list[_Node] = []
        while i < self.n:
            c = self.s[i]
            if c == "[" or c == "(":
                node, i = (self.square if c == "[" else self.round)(i, depth + 1)
                out.append(node)
            elif c in _SPECIAL:
                break
            else:
                text, i = self.plain(i)
                out.append(text)
        return tuple(out), i

    def round(self, i: int, depth: int) -> tuple[_Node, int]:
        # "(" prompt ")" | "(" prompt ":" prompt ")"
        first, j = self.prompt(i + 1, depth)
        parts: list[_Node] = ["(", *first]
        if j < self.n and self.s[j] == ":":
            second, j = self.prompt(j + 1, depth)
            parts += [":", *second]
        if j < self.n and self.s[j] == ")":
            return _Group(tuple(parts) + (")",)), j + 1
        raise _Fail

    def number_close(self, j: int) -> tuple[str, int] | None:
        """``[WS] NUMBER [WS] "]"`` at j -> (number, index after "]")."""
        k = j
        while k < self.n and self.s[k].isspace():
            k += 1
        m = _NUMBER_RE.match(self.s, k)
        if not m:
            return None
        k = m.end()
        while k < self.n and self.s[k].isspace():
            k += 1
        if k < self.n and self.s[k] == "]":
            return m.group(0), k + 1
        return None

    def square(self, i: int, depth: int) -> tuple[_Node, int]:
        first, j = self.prompt(i + 1, depth)
        if j >= self.n:
            raise _Fail
        c = self.s[j]
        if c == "]":  # "[" prompt "]": attention
            return _Group(("[", *first, "]")), j + 1
        if c == "|":  # "[" prompt ("|" [prompt])+ "]"
            options = [first]
            while j < self.n and self.s[j] == "|":
                opt, j = self.prompt(j + 1, depth)
                options.append(opt)
            if j < self.n and self.s[j] == "]":
                return _Alternate(tuple(options)), j + 1
            raise _Fail
        if c == ":":
            closed = self.number_close(j + 1)
            if closed is not None:  # "[to:when]"
                return _Scheduled(None, first, closed[0]), closed[1]
            second, k = self.prompt(j + 1, depth)
            if k < self.n and self.s[k] == ":":
                closed = self.number_close(k + 1)
                if closed is not None:  # "[from:to:when]"
                    return _Scheduled(first, second, closed[0]), closed[1]
        raise _Fail

    def start(self) -> tuple[_Node, ...]:
        """The whole prompt; stray brackets and colons at the top level are text."""
        out: list[_Node] = []
        i = 0
        while i < self.n:
            nodes, j = self._top_prompt(i)
            out.extend(nodes)
            if j >= self.n:
                break
            c = self.s[j]
            if c == "|":
                raise _Fail  # "|" outside brackets: A1111's grammar fails on the whole prompt
            out.append(c)  # a stray "[", "]", "(", ")" or ":"
            i = j + 1
        return tuple(out)

    def _top_prompt(self, i: int) -> tuple[list[_Node], int]:
        out: list[_Node] = []
        while i < self.n:
            c = self.s[i]
            if c == "[" or c == "(":
                try:
                    node, i = (self.square if c == "[" else self.round)(i, 1)
                except _Fail:
                    return out, i  # the opener is a stray character
                out.append(node)
            elif c in _SPECIAL:
                return out, i
            else:
                text, i = self.plain(i)
                out.append(text)
        return out, i


def _parse(text: str) -> tuple[_Node, ...] | None:
    """The prompt's tree, or None when A1111's grammar would not read it (then it is literal)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    try:
        return _Parser(text).start()
    except _Fail:
        return None


def _whens(nodes: tuple[_Node, ...], steps: int, out: dict[str, int], flags: list[bool]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            if node.when not in out:
                out[node.when] = _when_step(node.when, steps)
            if node.before is not None:
                _whens(node.before, steps, out, flags)
            _whens(node.after, steps, out, flags)
        elif isinstance(node, _Alternate):
            flags[0] = True
            for opt in node.options:
                _whens(opt, steps, out, flags)
        elif isinstance(node, _Group):
            _whens(node.parts, steps, out, flags)


def _when_step(when: str, steps: int) -> int:
    """A1111's switch step: a fraction of ``steps`` when written with ".", else a step number; capped."""
    v = float(when)
    if "." in when:
        v *= steps
    if math.isinf(v):  # "1e999": A1111 crashes (int(inf)); saturate instead
        return steps if v > 0 else -1
    return min(steps, int(v))


def _render(nodes: tuple[_Node, ...], step: int, whens: dict[str, int]) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            branch = node.before if step <= whens[node.when] else node.after
            if branch is not None:
                parts.append(_render(branch, step, whens))
        elif isinstance(node, _Alternate):
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
        else:
            parts.append(_render(node.parts, step, whens))
    return "".join(parts)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInput(f"a prompt schedule needs a step count of 1 or more, got {steps!r}")


def is_scheduled(text: str) -> bool:
    """True when ``text`` uses prompt editing or alternation (its text depends on the step)."""
    tree = _parse(text)
    if tree is None:
        return False
    found: dict[str, int] = {}
    flags = [False]
    _whens(tree, 1, found, flags)
    return bool(found) or flags[0]


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's schedule of ``text`` over ``steps``: ``[(end_at_step, text), ...]``, the last at ``steps``.

    >>> prompt_schedule("a [cat:dog:0.5] photo", 20)
    [(10, 'a cat photo'), (20, 'a dog photo')]
    """
    _check_steps(steps)
    tree = _parse(text)
    if tree is None:
        return [(steps, text)]
    whens: dict[str, int] = {}
    flags = [False]
    _whens(tree, steps, whens, flags)
    ends = set(range(1, steps + 1)) if flags[0] else {w for w in whens.values() if w >= 1}
    ends.add(steps)
    return [(end, _render(tree, end, whens)) for end in sorted(ends)]


def texts_per_call(text: str, steps: int) -> list[str]:
    """The text A1111 conditions each model call on: index ``i`` = call ``i`` (0-based), ``steps`` calls.

    A1111 picks the first schedule entry whose end step is ``>= i``, so call 0 and call 1 both use
    the first entry: ``[a|b]`` is a, a, b, a, b, ... and ``[cat:dog:0.5]`` at 20 steps is cat for
    calls 0-10.
    """
    schedule = prompt_schedule(text, steps)
    out: list[str] = []
    k = 0
    for i in range(steps):
        while schedule[k][0] < i:
            k += 1
        out.append(schedule[k][1])
    return out


def _embedding_name(match: re.Match[str]) -> str:
    name = match.group(1).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _EMBEDDING_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_prompt(text: str, *, negative: bool = False) -> str:
    """``text`` ready for scheduling: ComfyUI's ``embedding:name`` -> ``name``; unsupported syntax refused.

    ``AND`` (composable prompts; A1111 reads it in prompts, not in negative prompts) and
    extra-network tags (``<lora:...>``, ``<hypernet:...>``) raise :class:`InvalidInput` naming the
    syntax and what to do, since encoding them as characters would silently make another image.
    """
    text = str(text)
    tag = _EXTRA_NETWORK_RE.search(text)
    if tag:
        kind = tag.group(1)
        raise InvalidInput(
            f"{'negative ' if negative else ''}prompt has the extra-network tag {tag.group(0)!r} ({kind}): "
            "A1111 would apply that network, Likeness has no LoRA/hypernetwork loader and would only encode "
            "the characters; remove the tag (to use a character, train its embedding and write its token)"
        )
    if not negative and _AND_RE.search(text):
        raise InvalidInput(
            "prompt uses 'AND' (A1111's composable prompts: several prompts denoised together), which Likeness "
            "does not implement; write 'and' in lower case to mean the word, or generate the parts separately"
        )
    return _COMFY_EMBEDDING_RE.sub(_embedding_name, text)
