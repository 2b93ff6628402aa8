"""The cluster's temp dirs and private files: short (Ray's Unix sockets), 0700, 0600."""

from __future__ import annotations

import os
import secrets

from .errors import ClusterError

#: Ray's Unix socket path is the temp dir + about 62 bytes and may not exceed 107.
MAX_TMP_DIR = 40
TMP_PREFIX = "tsl-"


def new_root(tmp_base: str) -> str:
    """``<tmp_base>/tsl-<6 random chars>``: short (Ray's sockets) and unguessable."""
    return os.path.join(tmp_base.rstrip("/") or "/", TMP_PREFIX + secrets.token_hex(3))


def placeholder_root(tmp_base: str) -> str:
    """What the dry run shows for the temp dir it does not create."""
    return os.path.join(tmp_base.rstrip("/") or "/", TMP_PREFIX + "XXXXXX")


def check_root_length(root: str, longest: str) -> None:
    if len(longest) > MAX_TMP_DIR:
        raise ClusterError(
            f"temp dir {longest!r} is {len(longest)} characters; Ray's Unix sockets (temp dir + "
            f"~62 bytes, 107 at most) need {MAX_TMP_DIR} or less: set site.tmp_base to a short path such as /tmp"
        )


def make_root(root: str) -> None:
    """Create the job's temp dir, 0700 (fails if it exists: the name is ours alone)."""
    os.makedirs(os.path.dirname(root), exist_ok=True)
    os.mkdir(root, 0o700)
    os.chmod(root, 0o700)


def make_private_dir(path: str) -> None:
    """An existing or new dir, 0700 whatever the umask."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: str, text: str) -> None:
    """Write a 0600 file atomically (the secret never exists with looser permissions)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
