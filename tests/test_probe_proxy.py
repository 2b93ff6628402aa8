"""The Spark readiness probe reads the master's /json/ directly, whatever http_proxy says (issue 11.6)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from types import SimpleNamespace

from toksearch_launch.cluster.spark import Probe

STATE = {"status": "ALIVE", "workers": [{"host": "127.0.0.1", "state": "ALIVE", "cores": 2},
                                        {"host": "127.0.0.2", "state": "ALIVE", "cores": 3}]}


class _Master(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps(STATE).encode() if self.path == "/json/" else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_probe_ignores_a_dead_proxy(monkeypatch):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: a proxy there refuses every connection
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{dead.getsockname()[1]}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    ui = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Master)
    rpc = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=ui.serve_forever, daemon=True).start()
    try:
        plan = SimpleNamespace(head_ip="127.0.0.1",
                               ports=SimpleNamespace(head={"master": rpc.getsockname()[1],
                                                          "master_ui": ui.server_address[1]}))
        probe = Probe(plan, expected=2)
        assert probe.poll(), probe.error
        assert probe.ips == ["127.0.0.1", "127.0.0.2"] and probe.cpus == 5
        assert probe.error is None
    finally:
        ui.shutdown()
        ui.server_close()
        rpc.close()
        dead.close()


def test_probe_keeps_its_last_error_for_the_timeout_message():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    rpc = socket.create_server(("127.0.0.1", 0))
    try:
        plan = SimpleNamespace(head_ip="127.0.0.1",
                               ports=SimpleNamespace(head={"master": rpc.getsockname()[1],
                                                          "master_ui": closed.getsockname()[1]}))
        probe = Probe(plan, expected=1)
        assert not probe.poll()
        assert probe.head_up and "refused" in (probe.error or "").lower()
    finally:
        rpc.close()
        closed.close()
