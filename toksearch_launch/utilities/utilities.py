"""TokSearch's ``toksearch.utilities.utilities``: the helpers users' scripts import."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, Iterator, List, Sequence

from toksearch_launch.pipeline.record import error_info


def capture_exception(label: str, exc: BaseException) -> Dict[str, str]:
    """The error entry a Record stores: ``label``, ``type``, ``traceback`` (and ``message``)."""
    return error_info(exc, label)


def partition_it(seq: Sequence[Any], part_size: float) -> List[Sequence[Any]]:
    """``seq`` cut into consecutive pieces of about ``part_size`` items (fractional sizes allowed)."""
    if part_size <= 0:
        raise ValueError(f"part_size must be positive, got {part_size!r}")
    pieces = math.ceil(len(seq) / part_size)
    return [seq[int(i * part_size) : int((i + 1) * part_size)] for i in range(pieces)]


def chunk_it(seq: Sequence[Any], num: int) -> List[Sequence[Any]]:
    """``seq`` cut into ``num`` consecutive pieces of nearly equal size."""
    if num < 1:
        raise ValueError(f"num must be 1 or more, got {num!r}")
    return partition_it(seq, len(seq) / float(num)) if seq else []


@contextlib.contextmanager
def set_env(var: str, val: str) -> Iterator[None]:
    """Set an environment variable for the block, then restore it."""
    old = os.environ.get(var)
    os.environ[var] = val
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


@contextlib.contextmanager
def unset_env(var: str) -> Iterator[None]:
    """Remove an environment variable for the block, then restore it."""
    old = os.environ.pop(var, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[var] = old
