"""sd_notify against a real datagram socket, from a real node process."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.support import NodeProcess, node_config


def test_node_reports_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        node = NodeProcess(tmp_path, node_config(tmp_path / "spool"),
                           env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        node.start()
        try:
            seen: list[str] = []
            while not any("READY=1" in m for m in seen) or "WATCHDOG=1" not in seen:
                seen.append(sock.recv(4096).decode())
            assert any(f"port {node.smtp_port}" in m for m in seen)
            node.signal(signal.SIGTERM)
            while "STOPPING=1" not in seen:
                seen.append(sock.recv(4096).decode())
            assert node.wait() == 0
        finally:
            node.kill()
