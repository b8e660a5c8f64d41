"""Message ids (mta.envelope.new_message_id, encoded by the C base-32 encoder since ff614da):
what the spool and the tests use them for (shard_of) reads back only shards 0-63 and never
looks at their order. A planted alphabet with two digits swapped (Y and Z) passed every
test: ids then mis-sort, and a shard whose number has a digit of 30 or 31 reads back wrong."""

from __future__ import annotations

import time

from mta.envelope import new_message_id, received_at_of, shard_of


def test_every_shard_reads_back_from_its_ids() -> None:
    before = time.time()
    ids = [new_message_id(shard) for shard in range(1 << 16)]
    after = time.time()
    assert [shard_of(i) for i in ids] == list(range(1 << 16))
    assert all(int(before * 1000) / 1000 <= received_at_of(i) <= after for i in ids)


def test_ids_sort_in_the_order_they_were_made() -> None:
    # Within a millisecond the low digits count up: every digit value is crossed.
    ids = [new_message_id(7) for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert {i[-1] for i in ids} == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_ids_are_the_base32_of_their_value() -> None:
    """The digits are the value's 130 bits (two zeros on top), RFC 4648's base 32 in
    Crockford's alphabet: what ids were when base64 encoded them, and what _decode reads."""
    import base64

    from mta.envelope import _decode

    crockford = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567",
                                b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    for shard in (0, 1, 31, 32, 1023, 1 << 15, (1 << 16) - 1):
        for _ in range(200):
            made = new_message_id(shard)
            value = _decode(made)
            assert (value >> 64) & 0xFFFF == shard
            want = base64.b32encode((value << 30).to_bytes(20, "big"))[:26].translate(crockford)
            assert made == want.decode("ascii")


def test_ids_are_read_as_the_digit_by_digit_reading_did() -> None:
    """_decode reads ids with int() now: every id it made, and every ASCII string that is not
    one (other letters, blanks, signs, underscores, I L O U, lower case), reads as the former
    digit-by-digit reading read it, or is refused as it refused it. Non-ASCII is refused: the
    former reading upper-cased a long s to S and took it."""
    import random

    from mta.envelope import InvalidMessageId, _decode

    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    digits = {c: i for i, c in enumerate(crockford)}

    def former(text: str) -> int | None:
        value = 0
        for ch in text.upper():
            if ch not in digits:
                return None
            value = (value << 5) | digits[ch]
        return None if value >> 128 else value

    def now(text: str) -> int | None:
        try:
            return _decode(text)
        except InvalidMessageId:
            return None

    rng = random.Random(26)
    alphabet = crockford + crockford.lower() + "ILOUilou _+-\t\n!~\u00df\u0131\u017f\u00e90"
    cases = [new_message_id(rng.randrange(1 << 16)) for _ in range(500)]
    cases += ["".join(rng.choice(alphabet) for _ in range(26)) for _ in range(5000)]
    cases += ["".join(rng.choice(crockford) for _ in range(26)) for _ in range(500)]
    cases += [c.lower() for c in cases[:500]] + ["7" + "Z" * 25, "0" * 26, " " * 26,
                                                  "+" + "1" * 25, "1_" + "0" * 24]
    for text in cases:
        assert now(text) == (former(text) if text.isascii() else None), text
    assert sum(now(c) is not None for c in cases) >= 1000  # not all refused
    assert former("1" * 25 + "\u017f") is not None and now("1" * 25 + "\u017f") is None
