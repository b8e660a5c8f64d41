"""Hostile clients against MAIL and RCPT answered as they arrive (mta/ingress/session.py
``data_received``): under TLS, with plaintext injected after STARTTLS, and seen by the live
trace, command by command, each before its reply."""

from __future__ import annotations

import asyncio
from typing import Any

from mta.ingress.trace import TraceEvent, TraceFilter, TraceSubscription
from tests.support import Raw, port, wait_until


async def _until(sub: TraceSubscription, kind: str) -> list[TraceEvent]:
    out: list[TraceEvent] = []
    async with asyncio.timeout(10):
        while not out or out[-1].kind != kind:
            out.append(await sub.get())
    return out


async def test_after_starttls_injected_plaintext_is_dropped_and_mail_is_answered_at_once(
        start_node: Any, tls_files: Any, tls_ca: Any) -> None:
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key})
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    # RFC 3207 5: a MAIL sent in the clear with STARTTLS must never count.
    raw.writer.write(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
    assert (await raw.reply()).startswith("220")
    await raw.start_tls(tls_ca)
    [session] = node.ingress.sessions
    await wait_until(lambda: session._waiting_command, what="the loop waiting for a command")
    # Not greeted again after TLS: MAIL needs a new EHLO (RFC 3207 4.2).
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("503 5.5.1")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    await wait_until(lambda: session._waiting_command, what="the loop waiting again")
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    raw.writer.write(b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nRSET\r\n")
    assert [await raw.reply() for _ in range(3)] == [
        "250 2.1.5 Recipient OK", "250 2.1.5 Recipient OK", "250 2.0.0 OK"]
    assert (await raw.cmd("QUIT")).startswith("221")
    await raw.close()


async def test_the_trace_sees_commands_answered_at_once_each_before_its_reply(
        start_node: Any) -> None:
    node = await start_node()
    with node.ingress.trace.subscribe(TraceFilter()) as sub:
        raw = await Raw.connect(port(node))
        assert (await raw.reply()).startswith("220")
        assert (await raw.cmd("EHLO c.example")).startswith("250")
        [session] = node.ingress.sessions
        await wait_until(lambda: session._waiting_command, what="the loop waiting")
        assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
        raw.writer.write(b"RCPT TO:<b@example.org>\r\nrcpt to:<\xff@example.org>\r\nQUIT\r\n")
        assert [(await raw.reply())[:3] for _ in range(3)] == ["250", "501", "221"]
        await raw.close()
        events = await _until(sub, "disconnect")
    seen = [(e.kind, e.fields["line"][:9]) for e in events if e.kind in ("command", "reply")]
    assert seen[-8:] == [("command", "MAIL FROM"), ("reply", "250 2.1.0"),
                         ("command", "RCPT TO:<"), ("reply", "250 2.1.5"),
                         ("command", "rcpt to:<"), ("reply", "501 5.1.3"),
                         ("command", "QUIT"), ("reply", "221 Bye")]


def test_log_lines_of_two_threads_do_not_share_the_encoders_state() -> None:
    """The JSON encoder built once (mta/jsonenc.py) is shared by every thread that logs
    (the event loop, the spool writer, worker threads). A line that fails to encode in one
    thread must not break a line being encoded meanwhile in another, nor may two lines that
    hold the same list collide as a "circular reference"."""
    import threading

    from mta.jsonenc import encoder

    inside, go_on = threading.Event(), threading.Event()

    class Slow:
        """Encoded through ``default``: Python code, so the GIL goes to the other thread."""

        def __structlog__(self) -> str:
            if not inside.is_set():  # the first thread's line waits here, half encoded
                inside.set()
                assert go_on.wait(10)
            return "slow"

    def fallback(obj: Any) -> Any:
        return obj.__structlog__()

    dumps = encoder(default=fallback)
    shared = ["x", Slow()]
    out: dict[str, Any] = {}

    def first() -> None:
        try:
            out["first"] = dumps({"event": "a", "items": shared})
        except Exception as exc:  # reported by the assertion below
            out["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(10)
        # Meanwhile, this thread: a line with the same list, then one that cannot be encoded.
        assert dumps({"event": "b", "items": shared}) == '{"event": "b", "items": ["x", "slow"]}'
        try:
            dumps({"event": "c", (1, 2): "tuple key"})
        except TypeError:
            pass
    finally:
        go_on.set()
        thread.join(10)
    assert out["first"] == '{"event": "a", "items": ["x", "slow"]}'
