"""A private PostgreSQL server for the tests: its own data dir, a unix socket only, password auth.

``PrivatePostgres().start()`` runs Debian's ``initdb`` and ``postgres`` binaries in a
fresh temp dir (as the ``postgres`` or ``nobody`` user when run as root, since initdb
refuses root), with ``listen_addresses=''`` so that nothing is reachable over TCP and
nothing collides with another server. Readiness is a real login, polled until a
deadline; ``stop()`` ends the server by its PID (fast shutdown, then SIGKILL) and
removes the dir.

Run alone: ``python tests/pg_server.py`` starts one, prints its connection
parameters and waits for Ctrl-C.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

#: The role the tests log in as, and its password (a test secret, written to a 0600 file).
ROLE = "tsl"
PASSWORD = "tsl-test-secret-7f3a"
#: Only names the socket file (.s.PGSQL.<port>) inside the private socket dir.
PORT = 5432


def find_bindir() -> Optional[str]:
    """The newest Debian PostgreSQL bin dir that has initdb, else pg_config's, else None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return os.path.dirname(candidates[-1])
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and os.path.exists(os.path.join(out, "initdb")):
            return out
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def server_user() -> Optional[str]:
    """The account to run the server as: ourselves, or, as root, ``postgres`` (else ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, but there is no 'postgres' or 'nobody' user to run PostgreSQL as")


class PrivatePostgres:
    """One throw-away PostgreSQL server."""

    def __init__(self, bindir: Optional[str] = None) -> None:
        self.bindir = bindir or find_bindir()
        if not self.bindir:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql); see scripts/bootstrap.sh --tests")
        self.user = server_user()
        self.root = tempfile.mkdtemp(prefix="tsl-pg-")
        self.data = os.path.join(self.root, "data")
        self.socket_dir = os.path.join(self.root, "sock")
        self.log = os.path.join(self.root, "postgres.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def params(self) -> Dict[str, object]:
        """Keyword arguments for ``psycopg.connect`` (and ``site.sql``-style names in ``sql_options``)."""
        return {"host": self.socket_dir, "port": PORT, "user": ROLE, "password": PASSWORD, "dbname": "postgres"}

    def _run(self, argv: List[str]) -> None:
        done = subprocess.run(argv, user=self.user, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}")

    def start(self, timeout: float = 60.0) -> "PrivatePostgres":
        os.makedirs(self.socket_dir)
        pwfile = os.path.join(self.root, "pwfile")
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(PASSWORD + "\n")
        if self.user:
            info = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, info.pw_uid, info.pw_gid)
        os.chmod(self.root, 0o755)  # the tests (root or this user) reach the socket dir through it
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", ROLE, "--auth=scram-sha-256",
                   f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync", "--no-instructions"])
        os.unlink(pwfile)
        log = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.socket_dir, "-p", str(PORT),
                 "-c", "listen_addresses=", "-c", "fsync=off", "-c", "unix_socket_permissions=0777"],
                user=self.user, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll a real login until it works, the server exits, or the deadline passes."""
        import psycopg

        deadline = time.monotonic() + timeout
        last = "not tried"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; log: {self.log}: {self.tail()}")
            try:
                psycopg.connect(**self.params, connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres not ready after {timeout:g} s ({last}); log: {self.log}")

    def tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-800:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL to the session if it lingers, then remove the dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    server = PrivatePostgres().start()
    print({k: v for k, v in server.params.items()}, flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)
