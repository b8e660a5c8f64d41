"""Side by side with Postfix in one invocation: ``ingress`` then ``relay``, each with
``--peer postfix`` (every other option is passed to both).

    python -m benchmarks compare [--messages 10000] [--size 5] [--repeat 3]

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
    args = [a for a in sys.argv[1:]]
    for name, scenario in (("ingress", ingress), ("relay", relay)):
        sys.argv = [f"python -m benchmarks {name}", *args, "--peer", "postfix"]
        scenario.main()


if __name__ == "__main__":
    main()
