"""The accounting log says what the spool says, even across kill -9: every Reception ends in
exactly one final record per recipient, and every acknowledged message has its Reception."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support import NodeProcess, Sink, message, node_config, read_accounting, wait_until_sync

FINAL = ("Delivery", "Bounce", "Expiration", "AdminBounce")


def _submitter(port_of: Any, stop: threading.Event, acked: dict[str, int]) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port_of(), timeout=5) as smtp:
                smtp.ehlo("load.test")
                while not stop.is_set():
                    n += 1
                    rcpts = [f"a{n}@one.test", f"b{n}@two.test"]
                    smtp.mail("app@sender.test")
                    for r in rcpts:
                        smtp.rcpt(r)
                    code, reply = smtp.data(message(n, 800))
                    if code == 250:
                        acked[reply.decode().rsplit(" ", 1)[1]] = n
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)  # the node is being killed and restarted


def _under_load(acked: dict[str, int], sink: Sink) -> None:
    """Return once the node has acknowledged new mail and delivered some since the call: a
    kill then lands amid receptions and deliveries alike."""
    a0, d0 = len(acked), len(sink.messages)
    wait_until_sync(lambda: len(acked) >= a0 + 20 and len(sink.messages) >= d0 + 5, 30,
                    "new mail acknowledged and delivered")


def test_accounting_matches_the_spool_across_sigkill(tmp_path: Path) -> None:
    sink = Sink("127.0.0.1", 0)
    sink.start()
    acct = tmp_path / "acct.jsonl"
    raw = node_config(tmp_path / "spool", delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "retry_initial": "200ms",
        "retry_max": "1s", "accounting_log": str(acct), "connect_timeout": "5s",
        "command_timeout": "15s", "data_timeout": "15s"})
    node = NodeProcess(tmp_path, raw).start()
    acked: dict[str, int] = {}
    stop = threading.Event()
    thread = threading.Thread(target=_submitter, args=(lambda: node.smtp_port, stop, acked))
    thread.start()
    try:
        for _ in range(3):
            _under_load(acked, sink)
            node.signal(signal.SIGKILL)
            node.wait()
            node.start()
        _under_load(acked, sink)
        stop.set()
        thread.join(30)

        def records() -> list[dict[str, Any]]:
            return read_accounting(acct)

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            recs = records()
            received = {r["message_id"] for r in recs if r["type"] == "Reception"}
            finals = Counter((r["message_id"], r["recipient"]) for r in recs
                             if r["type"] in FINAL)
            if received and all((m, rc) in finals for r in recs if r["type"] == "Reception"
                                for m, rc in [(r["message_id"], x) for x in r["recipients"]]):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        node.kill()
        sink.stop()

    recs = records()
    receptions = Counter(r["message_id"] for r in recs if r["type"] == "Reception")
    assert len(acked) > 50, "too little load to mean anything"
    assert set(acked) <= set(receptions), "an acknowledged message has no Reception"
    assert max(receptions.values()) == 1, "a message was received twice"
    expected = {(r["message_id"], x) for r in recs if r["type"] == "Reception"
                for x in r["recipients"]}
    finals = Counter((r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL)
    if set(finals) != expected:
        from tests.support import read_spool
        live = read_spool(tmp_path / "spool", 4)
        missing = expected - set(finals)
        detail = {m: (m in live, live[m].state if m in live else None) for m, _ in missing}
        raise AssertionError(f"recipients without a final record: {sorted(missing)[:5]}; "
                             f"live in the spool (state): {detail}; extra: "
                             f"{sorted(set(finals) - expected)[:5]}")
    assert max(finals.values()) == 1, [k for k, v in finals.items() if v > 1][:5]
    assert all(r["type"] == "Delivery" for r in recs if r["type"] in FINAL)
    # ...and the sink got every message the log says was delivered.
    got = {(m.content.split(b"X-Test-Id: ")[1].split(b"\r\n")[0], rcpt)
           for m in sink.messages for rcpt in m.recipients}
    by_id = {r["message_id"]: r for r in recs if r["type"] == "Reception"}
    for mid, rcpt in finals:
        n = acked.get(mid)
        if n is not None:
            assert (str(n).encode(), rcpt) in got, (mid, rcpt)
    assert len(by_id) >= len(acked)
