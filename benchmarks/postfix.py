"""A private, throwaway Postfix instance for side-by-side benchmarks.

Its own config, queue and data directories under ``work``, an SMTP listener on a loopback port,
logging to a file there: nothing of the system's Postfix (or its queue) is touched. Needs the
``postfix`` package and root (Postfix's master runs as root and drops to ``mail_owner``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.common import cpu_seconds

__all__ = ["PrivatePostfix", "postfix_missing"]


def postfix_missing() -> str | None:
    """Why Postfix cannot be compared here, or None when it can."""
    if shutil.which("postfix") is None or not Path("/etc/postfix/master.cf").exists():
        return ("Postfix is not installed; install it with `apt-get install postfix` "
                "(choose 'No configuration': the benchmark runs its own private instance)")
    if os.geteuid() != 0:
        return "Postfix's master must start as root: run the comparison as root"
    return None


class PrivatePostfix:
    """``with PrivatePostfix(work, port, relay=None):`` a running instance; ``relay=None``
    accepts durably and delivers nothing (its queue manager is off), else relays everything to
    ``relay`` (host, port)."""

    def __init__(self, work: Path, port: int, relay: tuple[str, int] | None = None,
                 process_limit: int = 200) -> None:
        self.work = work
        self.port = port
        self.relay = relay
        self.process_limit = process_limit
        self.conf = work / "etc"

    def _write_config(self) -> None:
        for d in ("etc", "queue", "data"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)  # mkdtemp's 0700 would keep the postfix user out
        shutil.chown(self.work / "data", "postfix")
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.work / 'queue'}",
            f"data_directory = {self.work / 'data'}",
            "command_directory = /usr/sbin",
            "daemon_directory = /usr/lib/postfix/sbin",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = postfix.bench.example",
            "mydestination =",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"maillog_file = {self.work / 'maillog'}",
            f"maillog_file_prefixes = {self.work}",
            f"default_process_limit = {self.process_limit}",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0",
            "smtpd_client_message_rate_limit = 0",
            # Like our node: no DNS lookups of the client on the hot path.
            "smtpd_peername_lookup = no",
        ]
        if self.relay is None:
            # Accept only: every message goes to the hold queue, fsynced like any other
            # (switching the queue manager off instead makes cleanup wait a second per message
            # for it: an unfair handicap).
            lines.append("smtpd_recipient_restrictions = check_recipient_access static:HOLD, "
                         "permit_mynetworks, reject")
        else:
            host, port = self.relay
            lines += [f"relayhost = [{host}]:{port}",
                      "default_destination_concurrency_limit = 20",
                      "smtp_tls_security_level = none"]
        (self.conf / "main.cf").write_text("\n".join(lines) + "\n")
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"(?m)^smtp\s+inet\s.*$",
                        f"127.0.0.1:{self.port} inet n - n - - smtpd", master, count=1)
        (self.conf / "master.cf").write_text(master)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=60)

    def __enter__(self) -> PrivatePostfix:
        self._write_config()
        res = self._postfix("start")
        if res.returncode != 0:
            log = (self.work / "maillog").read_text() if (self.work / "maillog").exists() else ""
            raise RuntimeError(f"private postfix did not start: {res.stderr}{log[-2000:]}")
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private postfix does not listen")

    def __exit__(self, *exc: object) -> None:
        self._postfix("abort")  # no graceful drain needed: the queue is thrown away
        time.sleep(0.5)

    def cpu_seconds(self) -> float:
        """user + system CPU of the whole instance so far: its master, every live daemon
        (smtpd, cleanup, qmgr, smtp, ...) and every daemon that has exited (the master
        reaps them, so theirs is in its children's times). Read from /proc."""
        master = int((self.work / "queue" / "pid" / "master.pid").read_text().split()[0])
        return cpu_seconds(master)

    def queued(self) -> int:
        """Messages in its queue (every queue directory)."""
        root = self.work / "queue"
        return sum(len(files) for sub in ("incoming", "active", "deferred", "maildrop", "hold")
                   for _, _, files in os.walk(root / sub))
