"""The replicated spool with real node processes on a real etcd, each node its own spool
directory (no shared filesystem): a node killed under load with its disk wiped loses no
acknowledged message; a frozen follower leaves the in-sync set and rejoins; a frozen owner
loses its shards to their in-sync followers and answers no 250 for them once it wakes; a
shard below min_insync copies answers 451 until a copy returns."""

from __future__ import annotations

import shutil
import signal
import smtplib
import time
from pathlib import Path

import pytest

from tests.support import EtcdServer, message
from tests.support import wait_until_sync as _poll
from tests.support.cluster import (
    SHARDS,
    TTL,
    Cluster,
    Reply,
    all_delivered,
    replicated,
    stop_all,
)


@pytest.mark.slow
def test_sigkill_and_disk_loss_under_load_lose_no_acknowledged_message(
        tmp_path: Path, etcd: EtcdServer) -> None:
    # Closed (451) until the kill: every acknowledged message is still queued then, so the
    # victim's share exists only on its followers' copies once its disk is gone.
    with replicated(tmp_path, etcd, replicas=2) as run:
        c, acked = run.c, run.acked
        c.start_nodes(["n1", "n2", "n3"])
        c.wait(c.settled({"n1", "n2", "n3"}), 30, "settled")
        # Every shard has its second copy in the in-sync set before the load starts.
        _poll(lambda: len(m := c.members()) == SHARDS
              and all(len(v) >= 2 for v in m.values()), 60, "every shard on two copies")
        run.submit("n1", "n2", "n3")
        _poll(lambda: {k.split("-")[0] for k in list(acked)} == {"0", "1", "2"}
              and len(acked) >= 60, 30, "mail acknowledged by every node")
        victim = "n2"
        c.nodes[victim].kill()  # under load: its last acknowledgements were just sent
        shutil.rmtree(c.spool_of(victim))  # the disk is gone with the node
        t_kill = time.monotonic()
        stop_all(run.subs)
        assert not run.sink.messages, "nothing may have been delivered before the kill"
        run.open_.set()
        c.wait(c.settled({"n1", "n3"}), TTL + 15, "survivors own every shard")
        rto = time.monotonic() - t_kill
        got = all_delivered(acked, run.sink.messages, 90, max_dupes=2 * 2)
        dupes = {k: v for k, v in got.items() if v > 1}
        print(f"replicated failover with disk loss: {len(acked)} acked, takeover {rto:.2f}s, "
              f"duplicates {len(dupes)}")


# --- SIGSTOP / min_insync tests -----------------------------------------------------------------


def _taken_over(c: Cluster, lost: set[int], old: str, revs0: dict[int, int],
                tokens0: dict[int, int]) -> bool:
    """Is each of ``lost`` owned by a member of its in-sync set other than ``old``, under a
    new owner key and a newer token than before? (Read twice from etcd: a shard the leader
    moves between the reads reads inconsistent, the caller polls.)"""
    owners, revs, records = c.state()["owner"], _owner_revisions(c), c.sync_records()
    return all(owners.get(s) not in (None, old) and revs.get(s) != revs0[s]
               and records[s]["owner"] == owners[s] and owners[s] in records[s]["members"]
               and records[s]["token"] > tokens0[s] for s in lost)


def _owner_revisions(c: Cluster) -> dict[int, int]:
    """Each shard's owner key's create revision: it changes with every claim."""
    return {int(k.rsplit("/", 1)[1]): rev
            for k, (_v, rev) in c.etcd.get_prefix(c.prefix + "owner/").items()}


@pytest.mark.slow
def test_sigstopped_follower_leaves_the_insync_set_then_catches_up_and_rejoins(
        tmp_path: Path, etcd: EtcdServer) -> None:
    with replicated(tmp_path, etcd, replicas=3, min_insync=2, replica_timeout="1s") as run:
        c, acked, subs = run.c, run.acked, run.subs
        c.start_replicated(["n1", "n2", "n3"], copies=3)
        shard = min(s for s, o in c.state()["owner"].items() if o == "n1")
        run.submit("n1", "n2")
        _poll(lambda: len(subs[0].ok()) >= 20, 15, "mail acknowledged by n1")
        follower = c.nodes["n3"]
        follower.signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            # Shrink: n1 drops the silent n3 from its shard within a few replica_timeouts.
            _poll(lambda: "n3" not in c.members()[shard], 5, f"n3 out of sync/{shard}")
            t_drop = time.monotonic()
            assert c.members()[shard] == {"n1", "n2"}, c.sync_records()[shard]
            # ... and keeps acknowledging new mail on that very shard with two copies.
            _poll(lambda: sum(r.shard == shard for r in subs[0].ok(t_drop)) >= 3, 15,
                  f"250s on shard {shard} after the shrink")
            n_frozen = len(acked)
        finally:
            follower.signal(signal.SIGCONT)
        t_cont = time.monotonic()
        # n3 fenced itself while frozen (its lease expired); it rejoins, catches up, grows
        # back into the in-sync set of the shard it follows.
        _poll(lambda: "n3" in c.members()[shard], 25, f"n3 back in sync/{shard}")
        t_rejoin = time.monotonic()
        run.deliver_all()
        print(f"sigstop follower: {len(acked)} acked ({n_frozen} by the frozen time), "
              f"dropped from sync/{shard} {t_drop - t_stop:.2f}s after SIGSTOP, rejoined "
              f"{t_rejoin - t_cont:.2f}s after SIGCONT, total {run.elapsed():.1f}s")


def _open_transaction(port: int) -> smtplib.SMTP:
    """A client connection that has sent MAIL and RCPT, not yet DATA."""
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("c.example")
    s.mail("app@sender.test")
    s.rcpt("x@dest.test")
    return s


def _finish_transaction(s: smtplib.SMTP) -> tuple[int, bytes]:
    """Read the answer to a DATA already sent; if 354, send the message: the final reply."""
    code, reply = s.getreply()
    if code == 354:
        s.send(message(99999, 800) + b".\r\n")
        code, reply = s.getreply()
    s.close()
    return code, reply


def _assert_claimed_anew(c: Cluster, node: str, replies: list[Reply],
                         tokens0: dict[int, int]) -> None:
    """What ``node`` answered after it woke: 4xx, or a 250 for a shard ``node`` owns now
    under a newer claim (token) than the one in place before it froze."""
    owners, records = c.state()["owner"], c.sync_records()
    for r in replies:
        if r.code != 250:
            assert 400 <= r.code < 500, r
            continue
        rec = records[r.shard]
        assert owners[r.shard] == node and rec["owner"] == node, (r, rec)
        assert rec["token"] > tokens0[r.shard], (r, rec)


@pytest.mark.slow
def test_sigstopped_owner_past_its_lease_loses_its_shards_and_sends_no_250_for_them(
        tmp_path: Path, etcd: EtcdServer) -> None:
    with replicated(tmp_path, etcd, replicas=2) as run:
        c, acked, subs = run.c, run.acked, run.subs
        c.start_replicated(["n1", "n2", "n3"], copies=2)
        run.submit("n1", "n2", "n3")
        _poll(lambda: all(len(s.ok()) >= 10 for s in subs), 15, "mail acknowledged by all")
        owners0, tokens0 = (c.state()["owner"],
                            {s: r["token"] for s, r in c.sync_records().items()})
        revs0 = _owner_revisions(c)
        lost = {s for s, o in owners0.items() if o == "n2"}
        subs[1].stop()  # its client would only stall on the frozen node
        old = c.nodes["n2"]
        # A client of n2 is mid-transaction when n2 freezes; its DATA arrives meanwhile.
        pending = _open_transaction(old.smtp_port)
        old.signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            c.wait(c.settled({"n1", "n3"}), TTL + 10, "n1 and n3 took n2's shards")
            t_over = time.monotonic()
            # Each went to an in-sync follower under a new claim. (Not necessarily one of
            # members0: the follower that took it over may already have handed it to a
            # peer that caught up meanwhile, when the leader rebalanced.)
            _poll(lambda: _taken_over(c, lost, "n2", revs0, tokens0), 5,
                  "n2's shards owned by in-sync followers under newer claims")
            # The survivors keep acknowledging meanwhile (some on the taken-over shards).
            _poll(lambda: sum(r.shard in lost for s in (subs[0], subs[2])
                              for r in s.ok(t_over)) >= 5, 15, "250s on the lost shards")
            pending.putcmd("data")
        finally:
            old.signal(signal.SIGCONT)
        t_cont = time.monotonic()
        code, reply = _finish_transaction(pending)
        (late,) = run.submit("n2")  # whatever n2 answers once awake
        c.wait(c.settled({"n1", "n2", "n3"}), 30, "n2 back in service")
        _poll(lambda: len(late.ok()) >= 5, 15, "n2 accepting again on shards it owns now")
        stop_all(subs)
        # Never a 250 from n2 for a shard it does not own under a newer claim than before.
        late.replies.append(Reply("pending", t_cont, code, reply))
        _assert_claimed_anew(c, "n2", late.replies, tokens0)
        log = old.log()
        assert "cluster.fenced" in log or "node.fenced" in log, log[-2000:]
        run.deliver_all()
        refused = sum(r.code != 250 for r in late.replies)
        print(f"sigstop owner: {len(acked)} acked, {len(lost)} shards taken over "
              f"{t_over - t_stop:.2f}s after SIGSTOP, pending DATA answered {code}, "
              f"{refused} refused and {len(late.ok())} accepted by n2 after SIGCONT "
              f"({time.monotonic() - t_cont:.1f}s), total {run.elapsed():.1f}s")


@pytest.mark.slow
def test_min_insync_unreachable_answers_451_until_the_copy_returns(
        tmp_path: Path, etcd: EtcdServer) -> None:
    with replicated(tmp_path, etcd, replicas=2, min_insync=2) as run:
        c, acked, subs = run.c, run.acked, run.subs
        c.start_replicated(["n1", "n2"], copies=2)
        run.submit("n1", "n2")
        _poll(lambda: all(len(s.ok()) >= 10 for s in subs), 15, "mail acknowledged by both")
        c.nodes["n2"].kill()
        t_kill = time.monotonic()  # n2 is reaped: from here only one disk exists
        subs[1].stop()
        # The survivor takes every shard over (it is in every in-sync set)...
        c.wait(c.settled({"n1"}), TTL + 10, "n1 took every shard")
        t_over = time.monotonic()
        # ... but with one copy none is writable: 451 4.3.0, and never a 250.
        _poll(lambda: sum(r.code == 451 and r.sent >= t_over for r in subs[0].replies) >= 5,
              10, "451s from the survivor")
        bad = [r for r in subs[0].replies if r.sent >= t_kill and r.code != 451]
        assert not bad, bad[:5]
        assert all(r.text.startswith(b"4.3.0") for r in subs[0].replies
                   if r.sent >= t_over), subs[0].replies[-1]
        # n2 comes back with its disk: it catches up, the shards are on two copies again
        # and take mail.
        t_back = time.monotonic()
        c.start_node("n2")
        _poll(lambda: len(m := c.members()) == SHARDS
              and all(len(v) == 2 for v in m.values()), 30, "every shard on two copies again")
        t_insync = time.monotonic()
        run.submit("n2")
        _poll(lambda: len(subs[0].ok(t_insync)) >= 10 and len(subs[2].ok()) >= 10, 20,
              "mail accepted again")
        # Not one 250 for DATA sent while n2 was down.
        bad = [r for r in subs[0].ok(t_kill) if r.sent < t_back]
        assert not bad, bad[:5]
        run.deliver_all()
        n451 = sum(r.code == 451 for r in subs[0].replies)
        print(f"min_insync unreachable: {len(acked)} acked, {n451} answered 451, takeover "
              f"{t_over - t_kill:.2f}s, in sync {t_insync - t_back:.2f}s after the restart, "
              f"total {run.elapsed():.1f}s")
