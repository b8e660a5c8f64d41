"""Shared test helpers; test modules import these, never each other.

The real parts on loopback (etcd, node processes, the SMTP sink, DNS, configs, the poller)
live in the top-level ``harness`` package, which the benchmarks use too; they are re-exported
here so a test needs one import line. Test-only helpers:

- ``ctl``: mtactl against a node; ``smtp``: a line-level client, submissions, stored mail;
- ``spool``: read a spool as a restarted node would; ``world``: DNS + sinks + one node;
- ``etcd``: a proxy that cuts etcd off; ``cluster``: node processes on one etcd;
- ``attack``: the flood tests' hostile clients; ``crash_points``: a spool writer that dies
  at chosen points (run as a script).
"""

from __future__ import annotations

from pathlib import Path

from harness.config import make_config, node_config, toml_dumps
from harness.dns import DNSServer
from harness.etcd import EtcdServer
from harness.mail import message
from harness.net import free_port, free_port_on
from harness.node import NodeProcess, running_node
from harness.poll import wait_until, wait_until_sync
from harness.proc import rss_kb, status_kb
from harness.sink import AnyAddress, Received, Sink, SinkScript, greylisting_script
from tests.support.ctl import ctl, ctl_json
from tests.support.etcd import BlackHoleProxy
from tests.support.smtp import Raw, port, queued_id, stored, submit
from tests.support.spool import read_accounting, read_spool
from tests.support.world import SINK_HOSTS, World

ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "ROOT", "SINK_HOSTS", "AnyAddress", "BlackHoleProxy", "DNSServer", "EtcdServer",
    "NodeProcess", "Raw", "Received", "Sink", "SinkScript", "World", "ctl", "ctl_json",
    "free_port", "free_port_on", "greylisting_script", "make_config", "message",
    "node_config", "port", "queued_id", "read_accounting", "read_spool", "rss_kb",
    "running_node", "status_kb",
    "stored", "submit", "toml_dumps", "wait_until", "wait_until_sync",
]
