"""Real parts on loopback, shared by the tests and the benchmarks: an etcd server, mta node
subprocesses and their config files, a scripted SMTP sink, a DNS server, pollers.

``harness`` may import ``mta``; ``mta`` and ``cluster`` never import ``harness`` (an
import-linter contract), and the benchmarks take these from here, not from ``tests``.
"""
