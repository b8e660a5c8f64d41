"""The log writer (mta/logs.py LineWriter): info lines logged on the event loop go out
together at the end of the loop's turn, in order; a warning or worse, a line from another
thread, or one with no loop running goes out at once, never ahead of lines logged before it
on the same loop. And the lines' timestamp (``_Stamper``): ISO 8601, UTC, microseconds."""

from __future__ import annotations

import asyncio
import datetime
import io
import re
import threading
import time

from mta.logs import LineWriter, _Stamper


class _File(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_info_lines_of_a_turn_go_out_in_one_write_at_its_end() -> None:
    out = _File()
    writer = LineWriter(out)
    writer.info("a")
    writer.info("b")
    assert out.writes == []  # still this turn
    await asyncio.sleep(0)
    assert out.writes == ["a\nb\n"]
    writer.debug("c")
    await asyncio.sleep(0)
    assert out.writes == ["a\nb\n", "c\n"]


async def test_a_warning_goes_at_once_after_the_lines_before_it() -> None:
    out = _File()
    writer = LineWriter(out)
    writer.info("a")
    writer.warning("w")
    writer.info("b")
    assert out.getvalue() == "a\nw\n"
    await asyncio.sleep(0)
    assert out.getvalue() == "a\nw\nb\n"
    writer.error("e")
    writer.critical("c")
    assert out.getvalue() == "a\nw\nb\ne\nc\n"


async def test_another_thread_writes_at_once_and_leaves_the_loops_lines_alone() -> None:
    out = _File()
    writer = LineWriter(out)
    writer.info("loop")
    thread = threading.Thread(target=writer.info, args=("thread",))
    thread.start()
    thread.join()
    assert out.getvalue() == "thread\n"
    await asyncio.sleep(0)
    assert out.getvalue() == "thread\nloop\n"


def test_without_a_loop_every_line_goes_at_once() -> None:
    out = _File()
    writer = LineWriter(out)
    writer.info("a")
    writer.info("b")
    assert out.writes == ["a\n", "b\n"]


def test_the_timestamp_is_iso_8601_utc_with_microseconds_and_follows_the_clock() -> None:
    stamp = _Stamper()
    seen = []
    for _ in range(3):
        before = time.time()
        text = stamp(None, "info", {})["timestamp"]
        after = time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(text)), text
        at = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC).timestamp()
        assert before - 1e-6 <= at <= after + 1e-6
        seen.append(text)
    assert seen == sorted(seen)
