"""Frozen-dataclass configs built from plain dicts (TOML, JSON, protobuf).

Unknown keys fail, ``Literal`` fields are checked up front, and every message
names the field and says how to fix it (diffusers' ``check_inputs`` spirit).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from likeness.errors import InvalidInput

T = TypeVar("T")

# Seeds are stored as A1111 writes them: unsigned 32-bit (its "Seed:" field, torch.Generator.manual_seed).
SEED_MAX = 2**32 - 1


def bounded(default: Any, lo: Any, hi: Any, *, zero_means: str = "") -> Any:
    """A dataclass field whose default and inclusive bounds are declared in one place.

    ``from_dict`` checks the bounds of every such field; :func:`check_bounds` checks an
    instance built directly. ``zero_means`` explains a 0 that stands for "use the default"
    (for example ``"the spec's"``), so the message can say so.
    """
    return dataclasses.field(default=default, metadata={"bounds": (lo, hi), "zero_means": zero_means})


def same_as(cls: type, name: str) -> Any:
    """A field with the default and bounds of ``cls.name`` (one home for an option used in two configs)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=f.default, metadata=dict(f.metadata))


def field_bounds(cls: type, name: str) -> tuple[Any, Any]:
    """The inclusive (lo, hi) bounds declared on ``cls.name`` with :func:`bounded`."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["bounds"]


def check_bounds(obj: Any, where: str = "") -> None:
    """Raise InvalidInput naming the first field of ``obj`` outside its declared bounds."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        if "bounds" not in f.metadata:
            continue
        lo, hi = f.metadata["bounds"]
        value = getattr(obj, f.name)
        if value is None or lo <= value <= hi:
            continue
        zero = f.metadata.get("zero_means")
        what = f"0 ({zero}) or {max(lo, 1)} to {hi}" if zero and lo == 0 else f"{lo} to {hi}"
        raise InvalidInput(f"{prefix}{f.name}: {value!r} is out of range; use {what} (default {f.default!r})")


def check_seed(seed: int, where: str, *, random_ok: bool = True) -> int:
    """A seed in 0..2**32-1 (or -1 = random, drawn once and recorded, when ``random_ok``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (-1 if random_ok else 0) <= seed <= SEED_MAX:
        allowed = f"-1 (random, recorded) or 0..{SEED_MAX}" if random_ok else f"0..{SEED_MAX}"
        raise InvalidInput(f"{where}: {seed!r} is not a valid seed; use {allowed}")
    return seed


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise InvalidInput(
                f"{where}: {value!r} is not valid; use one of {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except InvalidInput as exc:
                errors.append(str(exc))
        raise InvalidInput(errors[0] if errors else f"{where}: unexpected {value!r}")
    if origin in (tuple,):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise InvalidInput(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise InvalidInput(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidInput(f"{where}: expected a table/mapping, got {type(value).__name__}")
        kt, vt = get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise InvalidInput(f"{where}: expected a table/mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InvalidInput(f"{where}: expected text, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise InvalidInput(f"{where}: expected {_describe(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys fail.

    ``where`` prefixes messages (e.g. ``"spec.generation"``) so the user sees
    which field of which file to fix.
    """
    if not isinstance(data, dict):
        raise InvalidInput(f"{where or cls.__name__}: expected a table/mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        raise InvalidInput(
            f"{prefix}{unknown[0]}: unknown field; valid fields are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise InvalidInput(f"{prefix}{missing[0]}: required field is missing")
    obj = cls(**kwargs)
    check_bounds(obj, where)
    return obj


def to_dict(obj: Any) -> Any:
    """A JSON-ready dict of a (nested) dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj
