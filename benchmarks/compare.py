"""Side by side with Postfix in one invocation: ``ingress`` then ``relay``, each with
``--peer postfix`` (every other option is passed to both).

    python -m benchmarks compare [--messages 10000] [--size 5] [--repeat 3] [--replicated]

``--replicated``: ingress also runs the replicated spool (``--targets
mta,mta-replicated,postfix``: 2 nodes, each its own spool, every message on both disks before
its 250), interleaved with the others; relay compares the single node as before.

Without Postfix it says so and how to install it; it never prints a made-up figure.
"""

from __future__ import annotations

import sys

from benchmarks import ingress, relay
from benchmarks.postfix import postfix_missing


def main() -> None:
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        raise SystemExit(0)
    if (why := postfix_missing()) is not None:
        print(f"compare: {why}", file=sys.stderr)
        raise SystemExit(2)
    args = [a for a in sys.argv[1:] if a != "--replicated"]
    for name, scenario in (("ingress", ingress), ("relay", relay)):
        more = (["--targets", "mta,mta-replicated,postfix"]
                if name == "ingress" and "--replicated" in sys.argv else [])
        sys.argv = [f"python -m benchmarks {name}", *args, "--peer", "postfix", *more]
        scenario.main()


if __name__ == "__main__":
    main()
