"""Record: the per-shot unit a pipeline carries from step to step.

A Record is a ``dict`` subclass: user code treats it as a dict, and it converts to
and from a plain dict without copying values (records cross process boundaries as
plain dicts, see ``ops.run_partition_wire``). ``shot`` and ``errors`` are fields
like any other but can never be removed: every result must say which shot it is
and what went wrong with it.
"""

from __future__ import annotations

import numbers
import operator
import traceback
from typing import Any, Dict, Iterable, Mapping, Optional

#: Fields that keep()/discard()/del never remove.
PROTECTED_FIELDS = frozenset({"shot", "errors"})
#: Fields a source dict (or an SQL row) may not bring: TokSearch reserves them.
RESERVED_SOURCE_FIELDS = ("key", "errors")


class InvalidShotNumber(ValueError):
    """A shot that is not a whole number."""


class MissingShotNumber(KeyError):
    """A source dict without a ``shot`` key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidRecordField(ValueError):
    """A source dict with a reserved field (``key`` or ``errors``), as TokSearch refuses it."""


class ProtectedFieldError(KeyError):
    """An attempt to delete ``shot`` or ``errors``."""


def as_shot(value: Any) -> int:
    """A shot number as int; integer-valued strings are accepted (SQL sources), floats with a fraction are not."""
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, float, complex)):
        # Decimal (SQL NUMERIC columns), numpy floats: accepted when integral.
        try:
            if value == int(value):
                return int(value)
        except (ValueError, OverflowError):
            pass
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, float) and value.is_integer():
        return int(value)
    raise InvalidShotNumber(f"shot must be a whole number, got {value!r} ({type(value).__name__})")


def error_info(exc: BaseException, label: str = "") -> Dict[str, str]:
    """A picklable description of an exception (the exception itself may not pickle).

    TokSearch's entry: ``label`` (the key it is filed under), ``type``
    (``str(exc.__class__)``, e.g. ``"<class 'ValueError'>"``) and ``traceback``;
    ``message`` (``str(exc)``) is added so a one-line report needs no parsing.
    """
    return {
        "label": label,
        "type": str(exc.__class__),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def error_type_name(info: Mapping[str, Any]) -> str:
    """The bare class name of an error entry's ``type`` (``"<class 'a.B'>"`` -> ``"B"``)."""
    text = str(info.get("type", ""))
    if text.startswith("<class '") and text.endswith("'>"):
        text = text[len("<class '") : -2]
    return text.rsplit(".", 1)[-1]


class Record(dict):
    """Data of one shot: a dict with ``shot`` (int) and ``errors`` (name -> error info).

    Deliberately no ``__setitem__`` override: building, filling and copying a
    record stays in C, which matters when each of thousands of records does little.
    """

    __slots__ = ()

    def __init__(self, shot: Any, fields: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        dict.__setitem__(self, "shot", as_shot(shot))
        dict.__setitem__(self, "errors", {})
        if fields:
            for key, value in fields.items():
                if key == "shot":
                    continue
                if key == "errors":
                    if not isinstance(value, Mapping):
                        raise ValueError(f"errors must be a mapping, got {type(value).__name__}")
                    dict.__setitem__(self, "errors", dict(value))
                    continue
                dict.__setitem__(self, key, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Record":
        """A Record from a mapping that has a ``shot`` and neither ``key`` nor ``errors`` (TokSearch's rule)."""
        if "shot" not in data:
            raise MissingShotNumber(f"a record needs a 'shot' field; got fields {sorted(map(str, data))}")
        for name in RESERVED_SOURCE_FIELDS:
            if name in data:
                raise InvalidRecordField(f"field {name!r} is reserved and cannot come from a source dict (shot {data['shot']!r})")
        return cls(data["shot"], data)

    @property
    def shot(self) -> int:
        return dict.__getitem__(self, "shot")

    @property
    def errors(self) -> Dict[str, Dict[str, str]]:
        return dict.__getitem__(self, "errors")

    def __delitem__(self, key: str) -> None:
        if key in PROTECTED_FIELDS:
            raise ProtectedFieldError(f"{key!r} cannot be removed from a Record")
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        """Remove and return a field; ``shot``, ``errors`` and ``key`` are left alone (None), as in TokSearch."""
        if key in PROTECTED_FIELDS or key == "key":
            return None
        return dict.pop(self, key, *default)

    def popitem(self) -> Any:  # type: ignore[override]
        raise ProtectedFieldError("popitem could remove 'shot' or 'errors'; use pop(key)")

    def clear(self) -> None:
        """Remove every field except ``shot`` and ``errors``."""
        for key in [k for k in self if k not in PROTECTED_FIELDS]:
            dict.__delitem__(self, key)

    def set_error(self, name: str, exc: BaseException) -> str:
        """Store ``exc`` under ``name`` (``name_1``, ``name_2``... if taken); returns the key used."""
        key, i = name, 1
        while key in self.errors:
            key = f"{name}_{i}"
            i += 1
        self.errors[key] = error_info(exc, key)
        return key

    def keep(self, fields: Iterable[str]) -> None:
        """Remove every field not in ``fields`` (``shot`` and ``errors`` stay)."""
        wanted = set(_as_field_list(fields)) | PROTECTED_FIELDS
        for key in [k for k in self if k not in wanted]:
            dict.__delitem__(self, key)

    def discard(self, fields: Iterable[str]) -> None:
        """Remove the fields in ``fields`` that exist (``shot`` and ``errors`` stay)."""
        for key in _as_field_list(fields):
            if key not in PROTECTED_FIELDS:
                dict.pop(self, key, None)

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (shallow copy; ``errors`` copied too)."""
        out = dict(self)
        out["errors"] = dict(self.errors)
        return out

    def copy(self) -> "Record":  # type: ignore[override]
        return Record(self.shot, self)

    def __repr__(self) -> str:
        return f"Record({dict.__repr__(self)})"


def _as_field_list(fields: Iterable[str] | str) -> list:
    """Accept one field name as well as a list of them (a bare string is a common slip)."""
    if isinstance(fields, str):
        return [fields]
    return list(fields)
