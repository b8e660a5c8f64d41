"""Judging a run: every session's replies and close, and the spool against what was
acknowledged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from tests.fuzz.client import resolve
from tests.fuzz.model import (
    _MARKER_RE,
    _QUEUED_RE,
    _RECEIVED_RE,
    Attempt,
    Session,
    Violation,
    reply_problems,
)
from tests.fuzz.settings import TIMEOUT

# --- judging ---------------------------------------------------------------------------------


def judge(s: Session) -> list[tuple[str, str]]:
    """Every problem with one session's replies and its end: [(category, what)]."""
    out = list(s.notes)
    by_node = s.closed_by in ("node", "half")
    out += reply_problems(bytes(s.received), closed_by_node=by_node)
    out += [("internal", r.text) for r in s.replies if r.text.startswith("500 Error: (")]
    last = s.replies[-1].text if s.replies else ""
    owed = (s.expected - len(s.replies)) if s.expected is not None else int(s.waiting)
    if s.expected is not None and len(s.replies) > s.expected:
        out.append(("count", f"{len(s.replies)} replies to {s.expected} commands"))
    if by_node and last[:3] not in ("221", "421") and not (s.tls and last.startswith("220")):
        timed_out = (s.eof_at or 0.0) >= 0.9 * TIMEOUT
        if owed > 0 or (s.closed_by == "node" and not timed_out):
            eof_at = s.eof_at or 0.0
            out.append(("disconnect", f"the node closed the connection {eof_at:.2f}s in "
                                      f"after {last[:60]!r}, owing {max(owed, 0)} replies"))
    # What the client can tell about its messages, from the replies' positions.
    for att in s.attempts:
        if att.state == "unread" and by_node and att.reply_index is not None:
            if att.reply_index < len(s.replies):
                resolve(att, s.replies[att.reply_index])
            else:
                att.state = "unanswered"
    return out


def _books(sessions: list[Session]) -> tuple[dict[str, tuple[Session, Attempt]],
                                            dict[str, tuple[Session, Attempt]],
                                            dict[str, Session]]:
    """(attempt by marker, acknowledged attempt by message id, session by "queued as" id)."""
    owner: dict[str, tuple[Session, Attempt]] = {}
    acked_ids: dict[str, tuple[Session, Attempt]] = {}
    for s in sessions:
        for att in s.attempts:
            if att.marker:
                owner[att.marker] = (s, att)
            if att.state == "acked":
                acked_ids[att.message_id] = (s, att)
    session_of_id: dict[str, Session] = {}
    for s in sessions:
        for r in s.replies:
            if m := _QUEUED_RE.search(r.text):
                session_of_id[m.group(1)] = s
    return owner, acked_ids, session_of_id


def _stored_problem(mid: str, msg: Any, owner: dict[str, tuple[Session, Attempt]],
                    acked_ids: dict[str, tuple[Session, Attempt]],
                    session_of_id: dict[str, Session], seen: Counter[str]
                    ) -> tuple[Session | None, str] | None:
    """What is wrong with one stored message, if anything (``seen`` counts its marker)."""
    end = msg.body.find(b"\r\n\r\n")
    m = _MARKER_RE.search(msg.body, 0, len(msg.body) if end < 0 else end + 2)
    if m is None:
        if mid not in acked_ids and mid not in session_of_id:
            return None, f"stored message {mid} that no session sent: {msg.body[:200]!r}"
        return None
    marker = m.group(1).decode()
    seen[marker] += 1
    if marker not in owner:
        return None, f"stored message {mid} with unknown marker {marker}"
    s, att = owner[marker]
    if att.state == "acked" and att.message_id == mid:
        return None
    if att.state == "unread":
        if att.reply_index is not None or s.closed_by not in ("node", "half"):
            return None  # the client closed before it could read the reply: either way
        if session_of_id.get(mid) is s:
            return None  # read to the end (a mutated session): its "queued as" named this
    return s, (f"message {marker} is in the spool as {mid} but its session "
               f"{'named ' + att.message_id if att.message_id else 'got no 250'} "
               f"(state {att.state}, reply {att.reply[:60]!r})")


def _acked_problems(s: Session, att: Attempt, mid: str, msg: Any) -> list[str]:
    """What is wrong with how an acknowledged message was stored."""
    if msg is None:
        return [f"acknowledged message {mid} ({att.marker}) is not in the spool"]
    problems = []
    if att.content is not None:
        prefix = msg.body[:len(msg.body) - len(att.content)]
        if not msg.body.endswith(att.content) or not _RECEIVED_RE.fullmatch(prefix):
            problems.append(f"message {mid} ({att.marker}) stored as {msg.body[:300]!r}"
                            f", expected one Received: header + {att.content[:200]!r}")
    if att.rcpts is not None and len(msg.envelope.recipients) != att.rcpts:
        problems.append(f"message {mid} has {len(msg.envelope.recipients)} "
                        f"recipients, {att.rcpts} were accepted")
    return problems


def judge_spool(sessions: list[Session], stored: dict[str, Any],
                final_id: str) -> list[tuple[Session | None, str]]:
    """The spool must hold exactly the messages that got a 250 after their final dot."""
    problems: list[tuple[Session | None, str]] = []
    owner, acked_ids, session_of_id = _books(sessions)
    seen: Counter[str] = Counter()
    for mid, msg in stored.items():
        if mid == final_id:
            continue
        problem = _stored_problem(mid, msg, owner, acked_ids, session_of_id, seen)
        if problem is not None:
            problems.append(problem)
    for marker, n in seen.items():
        if n > 1:
            problems.append((owner[marker][0], f"message {marker} stored {n} times"))
    for mid, (s, att) in acked_ids.items():
        problems += [(s, what) for what in _acked_problems(s, att, mid, stored.get(mid))]
    for mid, s in session_of_id.items():  # every "queued as" a client saw is kept
        if mid not in stored:
            problems.append((s, f"message {mid} was answered 250 but is not in the spool"))
    return problems


@dataclass
class FuzzRun:
    sessions: list[Session]
    violations: list[Violation]
    seconds: float
    rss_before: int
    rss_after: int
    rss_peak: int
    final_reply: tuple[int, bytes]
    final_stored: bool
    alive_after_run: bool
    exit_code: int | None
    node_log: str

    def of(self, *categories: str, bug: str | None = None) -> list[Violation]:
        return [v for v in self.violations if v.category in categories and v.bug == bug]


def collect(sessions: list[Session], stored: dict[str, Any], final_id: str) -> list[Violation]:
    out: list[Violation] = []

    def add(s: Session | None, category: str, what: str) -> None:
        bug = None  # every problem is new: the known ones are fixed
        out.append(Violation(category, bug, s.sid if s else -1, f"{s.kind}/{s.sub}" if s else "-",
                             what, repr(bytes(s.sent_head)) if s else "-"))

    for s in sessions:
        for category, what in judge(s):
            add(s, category, what)
    for s, what in judge_spool(sessions, stored, final_id):
        add(s, "spool", what)
    return out


def describe(violations: list[Violation], limit: int = 12) -> str:
    kinds = Counter(v.kind.split("/")[0] for v in violations)
    head = "\n".join(str(v) for v in violations[:limit])
    return f"{len(violations)} violations (by kind: {dict(kinds)}):\n{head}"
