"""Errors of the cluster starters: one clear message for the user, no traceback needed."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """A cluster could not be planned, started or stopped; ``str()`` is the whole message."""


class StartError(ClusterError):
    """A daemon failed during start: the message names the node, the command and its log."""

    def __init__(self, message: str, *, port_conflict: bool = False) -> None:
        super().__init__(message)
        #: True when the failure looks like a port taken by someone else (worth a retry
        #: with another port block).
        self.port_conflict = port_conflict
