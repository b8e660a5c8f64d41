"""The daemon as a real process: crash safety under SIGKILL, SIGTERM drain, config errors."""

from __future__ import annotations

import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT, NodeProcess, message, node_config, read_spool, running_node

LOOPS = ["asyncio", "uvloop"]


_ENOUGH = 300  # acknowledged messages before the kill


def _sender(port: int, worker: int, stop: threading.Event, acked: dict[str, bytes],
            attempted: dict[int, bytes], lock: threading.Lock, enough: threading.Event) -> None:
    """Submit messages until stopped or the node dies; record each 250 with its body, and
    set ``enough`` once ``_ENOUGH`` are acknowledged."""
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("load.example")
            while not stop.is_set():
                n += 1
                tag = worker * 1_000_000 + n
                body = message(tag, random.randint(200, 20_000))
                with lock:
                    attempted[tag] = body
                code, reply = s.data(body) if _mail(s) else (0, b"")
                if code == 250:
                    with lock:
                        acked[reply.decode().rsplit(" ", 1)[1]] = body
                        if len(acked) >= _ENOUGH:
                            enough.set()
    except (smtplib.SMTPException, OSError):
        return  # the node was killed under us


def _mail(s: smtplib.SMTP) -> bool:
    s.mail("load@example.com")
    code, _ = s.rcpt("sink@example.org")
    return code == 250


@pytest.mark.parametrize("loop", LOOPS)
def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path: Path, loop: str) -> None:
    raw = node_config(tmp_path / "spool", node={"loop": loop})
    node = NodeProcess(tmp_path, raw).start()
    acked: dict[str, bytes] = {}
    attempted: dict[int, bytes] = {}
    lock = threading.Lock()
    stop, enough = threading.Event(), threading.Event()
    workers = [threading.Thread(target=_sender, args=(node.smtp_port, w, stop, acked,
                                                      attempted, lock, enough))
               for w in range(16)]
    for t in workers:
        t.start()
    enough.wait(30)
    node.kill()  # SIGKILL in the middle of the load
    stop.set()
    for t in workers:
        t.join(15)
    assert len(acked) >= _ENOUGH, node.log()

    # Restart on the same spool: recovery must succeed and keep serving.
    with running_node(tmp_path, raw) as again:
        with smtplib.SMTP("127.0.0.1", again.smtp_port) as s:
            assert s.sendmail("a@example.com", ["b@example.org"], message(0)) == {}
        again.signal(signal.SIGTERM)
        assert again.wait() == 0

    stored = read_spool(tmp_path / "spool", 4)
    # Every message that got a 250 is there, byte for byte after our Received: header.
    for mid, body in acked.items():
        assert mid in stored, f"acknowledged message {mid} lost"
        assert stored[mid].body.endswith(body)
        assert stored[mid].body.startswith(b"Received: ")
    # Nothing half-written: every stored message is a complete copy of one that was sent.
    sent = {b for b in attempted.values()}
    for mid, msg in stored.items():
        if mid in acked:
            continue
        tail = msg.body.split(b"\r\n", 4)[-1]
        assert any(msg.body.endswith(b) for b in sent) or tail.endswith(message(0)[-40:]), mid


def _open_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.recv(1000)
    return s


def _cmd(s: socket.socket, line: bytes) -> bytes:
    s.sendall(line + b"\r\n")
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_drains_sessions_in_data_then_exits_zero(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool")
    node = NodeProcess(tmp_path, raw).start()
    # One client is in the middle of DATA, another is idle.
    busy = _open_session(node.smtp_port)
    _cmd(busy, b"EHLO busy.example")
    _cmd(busy, b"MAIL FROM:<a@example.com>")
    _cmd(busy, b"RCPT TO:<b@example.org>")
    assert _cmd(busy, b"DATA").startswith(b"354")
    body = message(7, 3000)
    busy.sendall(body[:1000])
    idle = _open_session(node.smtp_port)
    _cmd(idle, b"EHLO idle.example")

    node.signal(signal.SIGTERM)
    # The idle session is told the service is going away (recv waits for it, up to the
    # socket's 10 s); from then on new sessions get 421.
    assert idle.recv(1000).startswith(b"421 4.3.2")
    late = socket.create_connection(("127.0.0.1", node.smtp_port), timeout=10)
    assert late.recv(1000).startswith(b"421 4.3.2")
    # The session in DATA may finish and gets its 250.
    busy.sendall(body[1000:] + b".\r\n")
    reply = busy.recv(1000)
    assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
    assert node.wait() == 0
    # The 250 may come in the same packet as the 421 that closes the session afterwards.
    mid = reply.split(b"\r\n")[0].decode().split()[-1]
    assert read_spool(tmp_path / "spool", 4)[mid].body.endswith(body)


def _wait_draining(port: int, timeout: float = 10.0) -> None:
    """Until a new session is refused with 421 4.3.2: the node has begun a graceful stop."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            if s.recv(1000).startswith(b"421 4.3.2"):
                return
        assert time.monotonic() < deadline, "the node never began its graceful stop"
        time.sleep(0.05)


def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool", smtp={"shutdown_grace": 60})
    node = NodeProcess(tmp_path, raw).start()
    s = _open_session(node.smtp_port)
    _cmd(s, b"EHLO busy.example")
    _cmd(s, b"MAIL FROM:<a@example.com>")
    _cmd(s, b"RCPT TO:<b@example.org>")
    _cmd(s, b"DATA")  # and never finish: the graceful stop would wait for 60 s
    node.signal(signal.SIGTERM)
    _wait_draining(node.smtp_port)  # the first SIGTERM was taken: a graceful stop began
    assert node.proc is not None and node.proc.poll() is None  # and it waits for the DATA
    t0 = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(10) == 0
    assert time.monotonic() - t0 < 5


def _run_mta(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("toml", "expected"), [
    ("[smtp]\nlisten = 25\n", "[smtp] listen: expected \"host:port\""),
    ("[smtp]\nmax_message_size = \"lots\"\n", "[smtp] max_message_size: expected a size"),
    ("[smtp]\nlisen = \"127.0.0.1:25\"\n", "[smtp] lisen: unknown key"),
    ("[spool]\nshards = 0\n", "[spool] shards: expected a positive integer"),
    ("[smtpd]\n", "[smtpd]: unknown section"),
    ("[smtp]\nrelay_networks = [\"10.0.0.0/33\"]\n", "[smtp] relay_networks: expected a network"),
    ("[smtp]\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"/nonexistent.key\"\n",
     "[smtp] tls_cert: file '/nonexistent.pem' does not exist"),
    ("[node]\nid = \"bad id!\"\n", "[node] id: expected 1-63 characters"),
    ("not toml ===", "not valid TOML"),
    ("[probe]\nrecipient = \"nobody\"\n", "[probe] recipient: expected an address"),
    ("[probe]\ninterval = -1\n", "[probe] interval: expected a positive duration"),
    ("[slo]\navailability = 99.9\n", "[slo] availability: expected a number between 0 and 1"),
])
def test_bad_config_gives_one_line_naming_file_and_key(tmp_path: Path, toml: str,
                                                       expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    res = _run_mta("--config", str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_missing_config_file_and_bad_users_file(tmp_path: Path) -> None:
    res = _run_mta("--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert res.returncode == 2 and "file not found" in res.stderr and "Traceback" not in res.stderr
    users = tmp_path / "users"
    users.write_text("alice:plaintext-password\n")
    cfg = tmp_path / "n.toml"
    cfg.write_text(f"[smtp]\nlisten = \"127.0.0.1:0\"\nusers_file = \"{users}\"\n"
                   f"[spool]\npath = \"{tmp_path / 'spool'}\"\n[admin]\nenabled = false\n")
    res = _run_mta("--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"{users}:1" in res.stderr and "mtactl passwd" in res.stderr
    assert "Traceback" not in res.stderr


def test_port_in_use_and_spool_in_use_are_clear_errors(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool")
    with running_node(tmp_path, raw) as first:
        other = tmp_path / "other"
        other.mkdir()
        busy = node_config(tmp_path / "spool2", smtp={"listen": f"127.0.0.1:{first.smtp_port}"})
        (other / "n.toml").write_text(_toml(busy))
        res = _run_mta("--config", str(other / "n.toml"), cwd=other)
        assert res.returncode == 1 and "cannot listen on" in res.stderr
        assert "Traceback" not in res.stderr
        same_spool = node_config(tmp_path / "spool")
        (other / "s.toml").write_text(_toml(same_spool))
        res = _run_mta("--config", str(other / "s.toml"), cwd=other)
        assert res.returncode == 1 and "in use by another mta process" in res.stderr


def _toml(raw: dict) -> str:
    from tests.support import toml_dumps

    return toml_dumps(raw)


def test_check_flag_and_shipped_configs_are_valid(tmp_path: Path) -> None:
    res = _run_mta("--config", str(ROOT / "configs" / "standalone.toml"), "--check", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "configuration OK" in res.stdout


def test_log_lines_carry_one_node_id_and_no_duplicate_node_key(tmp_path: Path) -> None:
    """Every JSON log line names the node once, as node_id (not node and node_id both)."""
    import json

    raw = node_config(tmp_path / "spool")
    raw["node"]["log_level"] = "info"
    node = NodeProcess(tmp_path, raw).start()
    with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=10) as s:
        s.sendmail("a@example.com", ["b@example.org"], message(1, 500))
    node.signal(signal.SIGTERM)
    assert node.wait() == 0
    lines = [json.loads(x) for x in node.log().splitlines() if x.startswith("{")]
    assert len(lines) >= 3, node.log()  # started, received, stopping at least
    for line in lines:
        assert "node" not in line, line
        assert line.get("node_id") == "test-node", line
    [received] = [x for x in lines if x["event"] == "smtp.received"]
    # Who submitted it and how: no AUTH and no TLS on this session, said as such.
    assert (received["auth_user"], received["tls"], received["client_ip"]) == (
        None, False, "127.0.0.1"), received
