"""Process helpers the whole package shares: how a command is shown, how an exit status reads.

One of each, so a printed command is redacted wherever it is printed and a
child killed by a signal exits the same way everywhere.  Standard library only
(the CLI imports it).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
from typing import Iterable, Optional

#: Option names whose value is secret (user options may carry some): shown as <redacted>.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential")
_SECRET_FLAG = re.compile("(" + "|".join(_SECRET_WORDS) + ")", re.I)
REDACTED = "<redacted>"


@functools.lru_cache(maxsize=4096)  # the same option names recur on every node's command
def _secret_option(name: str) -> bool:
    return _SECRET_FLAG.search(name) is not None


def redact(argv: Iterable[str]) -> list[str]:
    """argv with the values of secret-looking options replaced (``--x-token V``, ``--x-secret=V``, ``-Dy.secret=V``)."""
    args = [str(a) for a in argv]
    words = "\0".join(args).casefold()
    if not any(word in words for word in _SECRET_WORDS):
        return args  # nothing secret-looking anywhere (substring tests; the dry run shows 1,000s of commands)
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and _secret_option(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


#: shlex.quote, remembered: a dry run's 1,000 nodes repeat the same words (~35 per command).
_quote = functools.lru_cache(maxsize=16384)(shlex.quote)


def display(argv: Iterable[str]) -> str:
    """The command as the user would type it, secrets redacted (for printing only)."""
    return " ".join(map(_quote, redact(argv)))


def exit_status(returncode: Optional[int]) -> int:
    """A child's return code as a shell reports it: 128 + N for death by signal N (None: 0)."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


def die_by_signal(signum: int) -> None:
    """End this process by ``signum``'s default action, as if no handler had been installed
    (a wrapper or a hook that caught it then exits the way its parent expects)."""
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL, SIGSTOP: no handler to reset
        pass
    os.kill(os.getpid(), signum)
