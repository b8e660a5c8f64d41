"""The DATA fast paths (mta.delivery.smtpdata) give exactly what aiosmtplib's own line-ending
normalisation and dot-stuffing give, on messages built to hit every branch."""

from __future__ import annotations

import random

from aiosmtplib import protocol

from mta.delivery import smtpdata

PIECES = [b"a", b"text ", b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\n.", b"\r.",
          b"\x00", b"\xff", b"From: x\r\n", b"\r\r\n", b"\n\r"]


def _original_stuff(message: bytes) -> bytes:
    return smtpdata._ORIGINAL_PERIOD.sub(b"..", message)


def test_fast_paths_equal_the_librarys_code_on_random_messages() -> None:
    rng = random.Random(20261201)
    cases = [b"", b".", b"\r\n", b".\r\n", b"a\r\n.b\r\n", b"a\rb", b"a\nb\r\n", b"a\r",
             b"x" * 5000 + b"\r\n"]
    cases += [b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))
              for _ in range(20_000)]
    for message in cases:
        normalized = smtpdata.normalize_line_endings(message)
        assert normalized == smtpdata._original_normalize(message), message
        assert smtpdata.stuff_periods(normalized) == _original_stuff(normalized), message
        assert smtpdata.stuff_periods(message) == _original_stuff(message), message


def test_install_puts_them_in_aiosmtplibs_data_path() -> None:
    smtpdata.install()
    smtpdata.install()  # idempotent
    assert protocol.normalize_message_line_endings is smtpdata.normalize_line_endings
    assert protocol.PERIOD_REGEX.sub(b"..", b"a\r\n.b\r\n") == b"a\r\n..b\r\n"
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert protocol.PERIOD_REGEX.sub(b"..", plain) is plain  # nothing to do: no copy
