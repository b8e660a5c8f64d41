"""The fuzz run's settings: the seed, the plan, the limits of the node under test, and
the bugs the fuzzer found."""

from __future__ import annotations

import os

SEED = int(os.environ.get("MTA_FUZZ_SEED", "5321"))
ONLY = {int(x) for x in os.environ.get("MTA_FUZZ_ONLY", "").split(",") if x.strip()}
CONCURRENCY = 80
HEAVY_CONCURRENCY = 3  # sessions moving megabytes at once
TIMEOUT = 5.0  # the node's [smtp] command_timeout and data_timeout
MAX_SIZE = 8 * 1024 * 1024  # the node's max_message_size
MAX_RCPTS = 1000
REPLY_WAIT = 20.0  # a reply the node owes must come by then (it drops idle clients after TIMEOUT)
# Up to 64 MB is the spool's cache of just-accepted bodies (by design); the rest is buffers
# of the multi-megabyte sessions and allocator slack. A leak of even 1 KB per session would
# add 11 MB per run on top; a run measures 145-150 MB of growth.
RSS_GROWTH_BOUND_KB = 200 * 1024
BOGUS_LIMIT = 11  # the node ends a session (421) at this many unrecognised commands
KNOWN_VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                         "VRFY", "HELP", "AUTH", "STARTTLS", "EXPN"})
USER, PASSWORD = b"alice", b"s3cret"  # the users_file fixture of conftest.py
SHARDS = 4

# Sessions per kind. "slow" and "repro" run first: a few of them wait for the node's timeouts.
PLAN: dict[str, int] = {
    "slow": 10, "repro": 21, "valid": 1200, "overlong": 600, "overlong_mb": 12,
    "binary": 900, "line_endings": 700, "invalid_utf8": 700, "huge": 36, "many_rcpts": 24,
    "out_of_order": 1300, "flood": 450, "disconnect": 1800, "size": 500, "auth": 800,
    "starttls": 400, "dots": 700, "mutate": 1200,
}
HEAVY_KINDS = frozenset({"overlong_mb", "huge"})

# What the fuzzer found in the first version of the ingress (all fixed in mta/ingress/session.py).
FIXED_BUGS: dict[str, str] = {
    "A": "Unknown commands are echoed back raw, control characters included: `FOO\\x00\\rBAR` "
         "gets `500 Error: command \"FOO\\x00\\rBAR\" not recognized` with a NUL and a bare CR "
         "inside the reply line. Repro: printf 'EHLO x\\r\\nFOO\\0\\rBAR\\r\\nQUIT\\r\\n' | nc "
         "127.0.0.1 2525 | od -c",
    "B": "After 5 unrecognised commands the node closes the connection with `502 5.5.1 Too many "
         "unrecognized commands, goodbye.` (RFC 5321 3.8: a server that closes on its own "
         "says 421); when the commands came pipelined the 502 and every reply still buffered are "
         "dropped (the replies to EHLO and the 500s, even a `250 ... queued as` of an earlier "
         "message): a reply-less disconnect. Repro: one write of 'EHLO x\\r\\nA\\r\\nB\\r\\nC\\r\\n"
         "D\\r\\nE\\r\\nF\\r\\nNOOP\\r\\n': the client gets only the 220 greeting, then EOF.",
    "C": "An AUTH response line longer than 1001 octets is answered twice: `500 Error: "
         "(ValueError) Separator is not found, and chunk exceed the limit` (an internal "
         "exception text), then the rest of the line is read as a command and gets `500 5.5.2 "
         "Command line too long`, so every later reply answers the wrong command. Repro: "
         "'EHLO x', 'AUTH PLAIN', then 1200 bytes of 'A', a pause, 1000 more and CRLF, 'NOOP': "
         "the NOOP is answered with the second 500.",
    "D": "Invalid UTF-8 in the EHLO argument, or in the local part of a MAIL FROM or RCPT TO "
         "with SMTPUTF8, is accepted: MAIL/RCPT/DATA get 250/250/354, then the end of DATA is "
         "answered `500 "
         "Error: (UnicodeEncodeError) 'utf-8' codec can't encode ... surrogates not allowed`: a "
         "permanent failure for every message of the session, with a traceback in the log. "
         "Repro: 'EHLO \\xff', 'MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.org>', 'DATA', "
         "'Subject: x', '', 'hi', '.'.",
    "E": "A client half-close (FIN after its last command) cancels the session at once "
         "(aiosmtpd's eof_received): commands already received get no reply, and a message "
         "whose final dot was received is fsynced into the spool but its 250 is never sent, so "
         "the client retries and the message is delivered twice; a FIN before the greeting "
         "leaves the connection open, without a greeting, until command_timeout. Repro: 'EHLO "
         "x', 'MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.org>', 'DATA', wait for 354, "
         "then a 70 KB body + '.\\r\\nQUIT\\r\\n' and shutdown(SHUT_WR): no 250, no 221, and "
         "the message is in the queue.",
    "F": "When one client write holds DATA and the first line of the message, the node holds "
         "back the replies to everything before it (EHLO, MAIL, RCPT, the 354) while it waits "
         "for the rest of the body: a client that waits for the 354 deadlocks until "
         "data_timeout closes the connection without a reply. Repro: one write of 'EHLO x\\r\\n"
         "MAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.org>\\r\\nDATA\\r\\nSubject: x\\r\\n' "
         "gets nothing but the greeting.",
    "G": "`MAIL FROM:<a@example.com> SIZE=\\xc2\\xb2` (SIZE=², a Unicode digit str.isdigit() "
         "accepts but int() does not) is answered `500 Error: (ValueError) invalid literal for "
         "int() with base 10: '²'` instead of 501, leaking an internal exception.",
    "H": "`MAIL FROM:<` (an address that is only an opening angle bracket, or `MAIL FROM:<...` "
         "with no closing one once the MAIL line limit has grown, see I) is answered `500 Error: "
         "(IndexError) string index out of range` (email._header_value_parser.get_angle_addr "
         "on an empty rest), with a traceback in the log. Repro: 'EHLO x', 'MAIL FROM:<'.",
    "I": "The MAIL command line limit is state shared by every session: aiosmtpd keeps "
         "command_size_limits on the class, each EHLO adds 36 to it and each new connection "
         "clears it. So whether a 700-byte MAIL line gets `500 Command line too long` or is "
         "parsed depends on how many EHLOs any session sent since the last connection was "
         "opened (every unknown verb also adds a key to that shared dict). Repro: one write of "
         "31 x 'EHLO x' then 'MAIL FROM:<' + 700 x 'a' + '@example.com>': 501 (parsed) instead "
         "of 500; the same MAIL line right after one EHLO gets 500.",
}
