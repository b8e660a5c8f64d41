"""DATA answered, and its body read, as they arrive (mta/ingress/session.py ``data_received``,
mta/ingress/data.py ``Body.feed``) while the command loop waits: the same body and the same
replies as the reader's path, wherever the arrivals are cut, and the loop woken once a
message, with the body."""

from __future__ import annotations

import itertools
import random
from typing import Any

from mta.ingress.data import Body
from tests.support import Raw, message, port, stored, wait_until
from tests.support.smtp import at_354, count_calls, end_in_three_arrivals, waiting_session

# --- Body.feed: the end of DATA found wherever the arrivals are cut -----------------------


class _Budget:
    """What a Body asks of its session: limits and an in-flight budget (here, unlimited)."""

    data_size_limit = 1 << 20
    line_length_limit = 1001
    _inflight = 0

    def _hold(self, total: int, limit: int) -> bool:
        self._inflight = total
        return True

    def _release_inflight(self) -> None:
        self._inflight = 0

    def _refusal(self, fault: int, size: int) -> str:
        return f"refused {fault}"


def _reference(stream: bytes) -> tuple[bytes, bytes]:
    """RFC 5321 4.5.2 read off the whole stream: (unstuffed body, what follows its end)."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    assert end >= 0
    body = framed[:end + 2].replace(b"\r\n.", b"\r\n")[2:]
    return body, framed[end + 5:]


def _fed(pieces: list[bytes]) -> tuple[bytes, bytes]:
    """The pieces fed one by one: (the body, everything after its end)."""
    body = Body(_Budget())  # type: ignore[arg-type]
    after: bytes | None = None
    rest = b""
    for piece in pieces:
        if after is None:
            after = body.feed(piece)
            rest = after or b""
        else:
            rest += piece
    assert after is not None, pieces
    content, refusal = body.result()
    assert refusal is None
    return content, rest


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


def test_the_end_of_data_is_found_wherever_the_arrivals_are_cut() -> None:
    """Bodies of dots, CRs, LFs and stuffed lines, their end and the next command cut into
    arrivals at random points: the body and the rest are what the whole stream says."""
    rng = random.Random(20)
    atoms = [b"\r\n", b".", b"\r", b"\n", b"a", b"..", b".\r\n", b"\r\n.\r", b"\r\n..\r\n",
             b"x" * 40]
    for _ in range(4000):
        stream = (b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
                  + b"\r\n.\r\nMAIL FROM:<a@b.example>\r\n")
        cuts = rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6)))
        assert _fed(_cut(stream, cuts)) == _reference(stream), (stream, cuts)


def test_every_cut_and_every_byte_alone() -> None:
    """The tricky ends (the first line a dot, a stuffed dot last, CRs before the end), cut
    at every single point and fed a byte at a time."""
    for stream in (b".\r\nNOOP\r\n", b"\r\n.\r\n", b"..\r\n.\r\n", b"a\r\n..\r\n.\r\nX",
                   b"a\r\r\n.\r\n", b"a\r\n.\r\r\n.\r\n", b"a.\r\n.\r\n", b"\r\n\r\n.\r\n",
                   b"..x\r\n.a\r\n.\r\nQUIT\r\n"):
        want = _reference(stream)
        for cut in range(1, len(stream)):
            assert _fed(_cut(stream, [cut])) == want, (stream, cut)
        assert _fed([stream[i:i + 1] for i in range(len(stream))]) == want, stream


def test_an_arrival_is_taken_without_a_copy() -> None:
    """The usual arrival (lines, ending in CRLF, no end yet) is kept as the same object: a
    big body costs no copy of each arrival."""
    body = Body(_Budget())  # type: ignore[arg-type]
    piece = (b"y" * 68 + b"\r\n") * 1000  # over the size kept as it is
    assert body.feed(piece) is None
    assert body._parts == [piece] and body._parts[0] is piece


# --- a real node ----------------------------------------------------------------------------




async def test_a_message_wakes_the_command_loop_once(start_node: Any) -> None:
    """A client that waits for each reply: MAIL, RCPT, DATA and the body are taken as they
    arrive; the loop wakes once, with the body, and stores it; the reader never reads."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    reads = count_calls(session, "_read_line")
    bodies = count_calls(session, "_read_body")
    taken = count_calls(session, "_data_taken")
    for n in range(3):
        await at_354(raw)
        assert session.in_data
        raw.writer.write(message(n, 3000) + b"..stuffed\r\n.\r\n")
        assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
        assert not session.in_data
    assert (reads, bodies, taken) == ([0], [0], [3])
    msgs = list((await stored(node)).values())
    assert len(msgs) == 3
    assert all(m.body.endswith(b"\r\n.stuffed\r\n") for m in msgs)
    assert node.ingress.inflight_bytes == 0
    await raw.close()


async def test_the_end_of_data_split_over_arrivals(start_node: Any) -> None:
    """The end of DATA in three arrivals ("\\r\\n.", "\\r", "\\n"): the dot and the CR wait
    for what follows, and are not part of the body."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await at_354(raw)
    await end_in_three_arrivals(raw, session, message(1, 500) + b"last line\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await raw.reply() == "250 2.0.0 OK"  # the NOOP after it, answered by the loop
    [msg] = (await stored(node)).values()
    assert msg.body.endswith(b"\r\nlast line\r\n")
    await raw.close()


async def test_pipelined_data_behind_a_command_the_loop_answers(start_node: Any) -> None:
    """DATA behind a command only the loop answers (RSET): the loop answers DATA and the
    reader reads the body, with the same replies and the same stored body."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    bodies = count_calls(session, "_read_body")
    raw.writer.write(b"RSET\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                     b"DATA\r\n")
    assert [(await raw.reply())[:4] for _ in range(4)] == ["250 ", "250 ", "250 ", "354 "]
    raw.writer.write(message(2, 800) + b"..dot\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert bodies == [1]
    [msg] = (await stored(node)).values()
    assert msg.body.endswith(b"\r\n.dot\r\n")
    await raw.close()


async def test_data_refused_at_once_is_answered_by_the_loop(start_node: Any) -> None:
    """DATA before RCPT, or after a failed TLS: not taken at once; the loop's reply, once."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    assert await raw.cmd("DATA") == "503 5.5.1 Need RCPT command first"
    assert not session.in_data and session._arriving is None
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await raw.cmd("DATA") == "503 5.5.1 Need RCPT command first"
    assert await raw.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Recipient OK"
    assert await raw.cmd("DATA x") == "501 5.5.4 Syntax: DATA"
    assert (await raw.cmd("data")).startswith("354 ")
    raw.writer.write(b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    await raw.close()


async def test_a_client_gone_mid_body_gives_everything_back(start_node: Any) -> None:
    """A half-close in the middle of a body taken at once: no message, no 250, the budget
    and the in-DATA mark given back, the connection closed."""
    node = await start_node()
    ingress = node.ingress
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await at_354(raw)
    raw.writer.write(message(3, 200_000))
    await wait_until(lambda: ingress.inflight_bytes >= 150_000, what="the body in flight")
    raw.writer.write_eof()
    assert await raw.reply() == ""  # closed, nothing owed
    await wait_until(lambda: ingress.inflight_bytes == 0 and not session.in_data,
                     what="the budget given back")
    assert await stored(node) == {}
    await raw.close()


async def test_a_refused_body_taken_at_once_keeps_the_session_in_step(start_node: Any) -> None:
    """A body over the size limit, taken at once: read to its end and refused with 552;
    the next message on the session goes through."""
    node = await start_node(smtp={"max_message_size": "64K"})
    raw = await Raw.connect(port(node))
    await waiting_session(node, raw)
    for n, size, want in ((1, 100_000, "552 5.3.4"), (2, 10_000, "250 2.0.0")):
        await at_354(raw)
        raw.writer.write(message(n, size) + b".\r\n")
        assert (await raw.reply()).startswith(want)
    assert len(await stored(node)) == 1
    assert node.ingress.inflight_bytes == 0
    await raw.close()


async def test_a_loop_cancelled_with_a_body_waiting_gives_its_budget_back(
        start_node: Any) -> None:
    """The body ends, and the session's task is cancelled before it runs (the node stops, a
    connection is cut in the same turn): the budget and the in-DATA mark are given back."""
    # A short grace: were the mark kept, the node's stop would wait all of it for the session.
    node = await start_node(smtp={"shutdown_grace": "1s"})
    ingress = node.ingress
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await at_354(raw)
    raw.writer.write(message(4, 100_000))
    await wait_until(lambda: ingress.inflight_bytes >= 90_000, what="the body in flight")
    # The end of data arrives, and in the same turn of the loop the task is cancelled.
    session.data_received(b".\r\n")
    assert session._wake is not None and session._wake.done()
    session._handler_coroutine.cancel()
    await wait_until(session._handler_coroutine.done, what="the task cancelled")
    assert ingress.inflight_bytes == 0 and not session.in_data
    assert await stored(node) == {}
    await raw.close()
