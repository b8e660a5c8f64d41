"""The session kinds: one script per kind of malformed or adversarial session."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from tests.fuzz.client import Conn, resolve
from tests.fuzz.model import (
    Attempt,
    Model,
    b64,
    body_lines,
    headers,
    is_bogus,
    split_at_terminator,
    stuff,
    text,
)
from tests.fuzz.settings import BOGUS_LIMIT, MAX_RCPTS, MAX_SIZE, PASSWORD, USER

# --- shared script pieces ------------------------------------------------------------------

HELO_NAMES = [b"client.example", b"[127.0.0.1]", b"localhost", b"x", b"mail.fuzz.example"]


async def hello(c: Conn, rng: random.Random, extended: bool | None = None) -> None:
    if extended is None:
        extended = rng.random() < 0.9
    verb = rng.choice([b"EHLO", b"ehlo", b"Ehlo"] if extended else [b"HELO", b"helo"])
    await c.cmd(verb + b" " + rng.choice(HELO_NAMES), "250")
    c.extended = extended


async def transaction(c: Conn, rng: random.Random, att: Attempt, wire: bytes, *,
                      rcpts: int = 1, mail: bytes = b"MAIL FROM:<fuzz@example.com>",
                      expect_mail: str = "250", expect_rcpt: str = "250",
                      pipelined: bool = False) -> None:
    """MAIL, RCPT x n, DATA, the message, and its reply (RFC 2920 groups when pipelined)."""
    cmds = [mail, *[b"RCPT TO:<r%d@example.org>" % i for i in range(rcpts)], b"DATA"]
    if pipelined:
        await c.send_lines(cmds)
        rs = [await c.reply() for _ in cmds]
    else:
        rs = [await c.cmd(x) for x in cmds]
    c.check(rs[0], expect_mail, cmds[0])
    if rs[0].code == "250":
        for x, r in zip(cmds[1:-1], rs[1:-1], strict=True):
            c.check(r, expect_rcpt, x)
    att.rcpts = sum(r.code == "250" for r in rs[1:-1])
    if rs[0].code == "250" and att.rcpts:
        c.check(rs[-1], "354", b"DATA")
    if rs[-1].code != "354":
        return
    await c.send_body(att, wire)
    await c.data_end(att)


async def simple_transaction(c: Conn, rng: random.Random, size: int = 1500,
                             **kw: Any) -> Attempt:
    att, wire = c.message(size)
    await transaction(c, rng, att, wire, **kw)
    return att


# --- session kinds -------------------------------------------------------------------------


async def k_valid(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng)
    if c.extended and rng.random() < 0.15:
        await c.cmd(b"AUTH PLAIN " + b64(b"\0" + USER + b"\0" + PASSWORD), "235")
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        size = rng.choice([100, 1500, 1500, 8000, 60000])
        att, wire = c.message(size, dots=rng.choice([0.0, 0.05, 0.3]),
                              eightbit=rng.random() < 0.2, std=rng.random() < 0.85)
        mail = b"MAIL FROM:<fuzz@example.com>"
        if c.extended:
            mail += rng.choice([b"", b" SIZE=%d" % len(wire), b" BODY=8BITMIME",
                                b" BODY=7BIT SIZE=%d" % len(wire)])
            if rng.random() < 0.1:
                mail = b"MAIL FROM:<>"
        await transaction(c, rng, att, wire, rcpts=rng.randint(1, 5), mail=mail,
                          pipelined=c.extended and rng.random() < 0.4)
        if rng.random() < 0.2:
            await c.cmd(rng.choice([b"RSET", b"NOOP"]), "250")
    await c.quit()


async def k_overlong(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    for _ in range(rng.randint(1, 3)):
        n = rng.choice([rng.randint(600, 990), rng.randint(1010, 20000),
                        rng.randint(20000, 300000)])
        verb = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"NOOP ", b"EHLO ", b"VRFY ",
                           b"HELP ", b"XYZZY ", b"", b"AUTH PLAIN "])
        filler = rng.choice([b"a", b"x@", b"<>", b" ", b"\x00", b"\xff", b"."])
        line = (verb + filler * n)[:n]
        await c.cmd(line, "500")
    await c.cmd(b"NOOP", "250")
    if rng.random() < 0.5:
        await simple_transaction(c, rng)
    await c.quit()


async def k_overlong_mb(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    n = rng.randint(1, 4) * 1024 * 1024 + rng.randint(0, 999)
    line = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"NOOP ", b""]) + text(rng, n)
    c.s.sub = rng.choice(["then_continue", "then_continue", "no_eol_fin", "no_eol_half"])
    if c.s.sub == "then_continue":
        await c.cmd(line, "500")
        await c.cmd(b"NOOP", "250")
        await simple_transaction(c, rng)
        await c.quit()
    else:
        await c.send_raw(line, owes=0)
        await c.close(c.s.sub.rsplit("_", 1)[1])


def binary_line(rng: random.Random) -> bytes:
    def junk(n: int) -> bytes:
        return bytes(rng.choice([rng.randrange(256), 0, 13, 0xFF]) for _ in range(n))

    v = rng.randrange(5)
    if v == 0:
        line = junk(rng.randint(1, 300))
    elif v == 1:
        line = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"VRFY ", b"HELP ", b"NOOP ",
                           b"EHLO "]) + junk(rng.randint(1, 80)) + b">"
    elif v == 2:
        base = rng.choice([b"NOOP", b"RSET", b"MAIL FROM:<a@example.com>", b"HELP"])
        i = rng.randrange(len(base) + 1)
        line = base[:i] + junk(rng.randint(1, 3)) + base[i:]
    elif v == 3:
        line = b"\x00" * rng.randint(1, 50)
    else:
        line = junk(rng.randint(1, 20)) + b" " + junk(rng.randint(1, 20))
    return line.replace(b"\n", b"\x00")


async def k_binary(c: Conn, rng: random.Random) -> None:
    await c.greet()
    if rng.random() < 0.7:
        await hello(c, rng)
    for _ in range(rng.randint(1, 8)):
        line = binary_line(rng)
        if is_bogus(line) and c.s.bogus >= BOGUS_LIMIT - 1:
            continue
        if line.rstrip(b"\r").upper().startswith((b"QUIT", b"DATA", b"AUTH", b"STARTTLS")):
            continue
        await c.cmd(line, "2|5")
    await c.cmd(b"RSET", "250")
    await c.quit()


async def k_line_endings(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["lf_session", "lf_body", "cr_commands", "mixed_eol", "smuggle"])
    if v == "lf_session":  # every command ends in a bare LF
        for line, exp in [(b"EHLO lf.example", "250"), (b"MAIL FROM:<lf@example.com>", "250"),
                          (b"RCPT TO:<r@example.org>", "250"), (b"DATA", "354")]:
            await c.send_lines([line], eol=b"\n")
            c.check(await c.reply(), exp, line)
        att, wire = c.message(rng.choice([300, 3000]))
        await c.send_body(att, wire)
        await c.data_end(att)
        await c.send_lines([b"QUIT"], eol=b"\n")
        c.check(await c.reply(), "221", b"QUIT")
        await c.wait_eof()
        return
    await hello(c, rng, extended=True)
    if v == "lf_body":  # message lines end in bare LF, the end of data is CRLF.CRLF
        await c.cmd(b"MAIL FROM:<lf@example.com>", "250")
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        marker = c.marker()
        lf = b"".join(text(rng, rng.randint(0, 40)) + rng.choice([b"\n", b"\n.\n", b"\n..\n"])
                      for _ in range(rng.randint(1, 12)))
        wire = headers(marker) + b"\r\n" + lf[:900] + b"\r\n.\r\n"
        att = c.register(marker, wire)
        await c.send_body(att, wire)
        await c.data_end(att)
    elif v == "cr_commands":  # bare CR is not a line end: the whole thing is one line
        parts = [b"NOOP", b"MAIL FROM:<cr@example.com>", b"RCPT TO:<r@example.org>", b"RSET"]
        line = b"\r".join(rng.sample(parts, rng.randint(2, 4))) + rng.choice([b"", b"\r"])
        await c.cmd(line, "2|5")
        await c.cmd(b"RSET", "250")
    elif v == "mixed_eol":
        for line in [b"NOOP", b"RSET", b"MAIL FROM:<m@example.com>", b"RCPT TO:<r@example.org>",
                     b"RSET", b"VRFY r@example.org"]:
            eol = rng.choice([b"\r\n", b"\n", b"\r\r\n", b"\n\r\n", b" \r\n"])
            data = line + eol
            c.plan_lines(data)
            await c.write(data)
            for _ in range(data.count(b"\n")):
                await c.reply()
    else:  # "smuggle": fake end-of-data sequences followed by a second transaction
        await c.cmd(b"MAIL FROM:<outer@example.com>", "250")
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        outer, inner = c.marker(), c.marker()
        fake = rng.choice([b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                           b"\r\n\x00.\r\n", b"\r\n .\r\n", b"\r\n.\x00\r\n"])
        smuggled = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                    + headers(inner) + b"\r\nsmuggled\r\n")
        wire = headers(outer) + b"\r\nouter text" + fake + smuggled + b".\r\n"
        if not wire.endswith(b"\r\n.\r\n"):
            wire = wire[:-3] + b"\r\n.\r\n"
        c.s.attempts.append(Attempt(inner, None, "-"))  # must never become a message of its own
        att = c.register(outer, wire)
        await c.send_body(att, wire)
        await c.data_end(att)
    await c.quit()


BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
            b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3"]


async def k_invalid_utf8(c: Conn, rng: random.Random) -> None:
    await c.greet()
    bad = rng.choice(BAD_UTF8)
    v = c.s.sub = rng.choice(["ehlo", "mail", "rcpt", "domain", "args", "body"])
    if v == "ehlo":
        await c.cmd(b"EHLO bad" + bad + b".example", "250")
    else:
        await hello(c, rng, extended=True)
    utf8 = rng.choice([b"", b" SMTPUTF8"])
    if v == "ehlo":
        await simple_transaction(c, rng, rng.choice([200, 2000]))
    elif v == "body":  # 8-bit, invalid UTF-8 text: a body is bytes, the node must keep them
        marker = c.marker()
        wire = stuff(headers(marker) + b"\r\n" + bad + b"\r\n" + body_lines(
            rng, 500, eightbit=True) + bad + b"\r\n")
        await transaction(c, rng, c.register(marker, wire), wire)
    elif v in ("mail", "rcpt", "domain"):
        mail, rcpt = b"MAIL FROM:<m@example.com>" + utf8, b"RCPT TO:<r@example.org>"
        if v == "mail":
            mail = b"MAIL FROM:<m" + bad + b"x@example.com>" + utf8
        elif v == "rcpt":
            rcpt = b"RCPT TO:<r" + bad + b"x@example.org>"
        else:
            rcpt = b"RCPT TO:<r@exa" + bad + b"mple.org>"
        r = await c.cmd(mail, "250|501|553|555")
        if r.code == "250":
            r = await c.cmd(rcpt, "250|501|553|555")
            if r.code == "250":  # accepted: then the message must be accepted too
                await c.cmd(b"DATA", "354")
                att, wire = c.message(500)
                await c.send_body(att, wire)
                await c.data_end(att)
    else:
        for verb in rng.sample([b"VRFY ", b"HELP ", b"NOOP ", b"EXPN ", b"AUTH PLAIN ",
                                b"AUTH ", b"RSET "], 3):
            await c.cmd(verb + bad, "2|5")
    await c.quit()


async def k_huge(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    v = c.s.sub = rng.choice(["many_headers", "many_headers", "long_header_line", "oversize",
                              "folded"])
    marker = c.marker()
    target = rng.randint(1, 7) * 1024 * 1024
    if v == "many_headers":
        extra = b"".join(b"X-Hdr-%d: %s\r\n" % (i, text(rng, rng.randint(20, 900)))
                         for i in range(target // 460))
    elif v == "long_header_line":
        extra = b"X-Long: " + text(rng, rng.choice([1100, 50000, 2 * 1024 * 1024])) + b"\r\n"
    elif v == "oversize":
        extra = b"".join(b"X-Big-%d: %s\r\n" % (i, text(rng, 900))
                         for i in range((MAX_SIZE + rng.randint(512, 2048) * 1024) // 900))
    else:
        extra = b"X-Fold: start\r\n" + b"".join(
            b"\t" + text(rng, rng.randint(1, 200)) + b"\r\n" for _ in range(target // 100))
    wire = stuff(headers(marker, extra) + b"\r\nbody\r\n")
    att = c.register(marker, wire)
    mail = b"MAIL FROM:<huge@example.com>"
    if rng.random() < 0.5:  # and a SIZE= that lies
        mail += b" SIZE=%d" % rng.choice([1, 1000, len(wire) // 2])
    await transaction(c, rng, att, wire, mail=mail)
    await c.quit()


async def k_many_rcpts(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    await c.cmd(b"MAIL FROM:<many@example.com>", "250")
    n = rng.choice([1000, 1001, 1200, 2000, 3000])
    lines: list[bytes] = []
    expects: list[str] = []
    good = 0
    for i in range(n):
        if rng.random() < 0.02:
            lines.append(rng.choice([b"RCPT TO:<nodomain>", b"RCPT TO:<a@b>", b"RCPT TO:"]))
            expects.append("501")
        else:
            lines.append(b"RCPT TO:<r%d@example.org>" % i)
            expects.append("250" if good < MAX_RCPTS else "452")
            good += 1
    await c.send_lines(lines)
    accepted = 0
    for line, exp in zip(lines, expects, strict=True):
        r = await c.reply()
        c.check(r, exp, line)
        accepted += r.code == "250"
    await c.cmd(b"DATA", "354")
    att, wire = c.message(800)
    att.rcpts = accepted
    await c.send_body(att, wire)
    await c.data_end(att)
    await c.quit()


async def k_out_of_order(c: Conn, rng: random.Random) -> None:
    await c.greet()
    m = Model()
    c.s.sub = rng.choice(["model", "model", "model", "model", "bogus_limit"])
    if c.s.sub == "bogus_limit":  # sequential unknown verbs past the node's limit
        await hello(c, rng, extended=True)
        for i in range(rng.randint(BOGUS_LIMIT - 1, BOGUS_LIMIT + 1)):
            await c.cmd(b"XFUZZ%d" % i, "500" if i < BOGUS_LIMIT - 1 else "500|421")
        await c.quit()
        return
    for _ in range(rng.randint(3, 14)):
        line, expect = m.step(rng, bogus_ok=c.s.bogus < BOGUS_LIMIT - 1, allow_data=True)
        r = await c.cmd(line, expect)
        if r.code == "354":
            att, wire = c.message(rng.choice([200, 2000]))
            await c.send_body(att, wire)
            await c.data_end(att)
    await c.quit()


async def k_flood(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["clean", "clean", "clean_body", "clean_body", "junk"])
    lines = [b"EHLO flood.example"]
    expects = ["250"]
    if v == "junk":  # past aiosmtpd's limit of unrecognised commands, in one write
        for _ in range(rng.randint(6, 300)):
            lines.append(rng.choice([b"XYZZY", b"BDAT 1 LAST", b"\x01\x02", b"  NOOP", b"FOO BAR"]))
            expects.append("500|421")
        lines += [b"NOOP", b"QUIT"]
        expects += ["250|421", "221|421"]
        await c.send_lines(lines, atomic=True)
        for line, exp in zip(lines, expects, strict=True):
            c.check(await c.reply(), exp, line)
        await c.wait_eof()
        return
    m = Model()
    m.helo = True
    bogus = 0
    for _ in range(rng.randint(100, 600)):
        line, exp = m.step(rng, bogus_ok=bogus < BOGUS_LIMIT - 2, allow_data=False)
        bogus += is_bogus(line)
        lines.append(line)
        expects.append(exp)
    data = b"".join(ln + b"\r\n" for ln in lines)
    c.plan_lines(data)
    att: Attempt | None = None
    if v == "clean_body":  # the whole transaction, body and QUIT included, in the same write
        tx = [b"RSET", b"MAIL FROM:<flood@example.com>", b"RCPT TO:<r@example.org>", b"DATA"]
        tx_data = b"".join(ln + b"\r\n" for ln in tx)
        c.plan_lines(tx_data)
        att, wire = c.message(rng.choice([300, 3000]))
        att.rcpts = 1
        c.plan_body(att, wire)
        data += tx_data + wire
        expects += ["250", "250", "250", "354", att.expect]
        lines += [*tx, b"<final dot>"]
    c.plan_lines(b"QUIT\r\n")
    await c.write(data + b"QUIT\r\n", atomic=rng.random() < 0.7)
    for line, exp in zip([*lines, b"QUIT"], [*expects, "221"], strict=True):
        r = await c.reply()
        c.check(r, exp, line)
        if att is not None and line == b"<final dot>":
            resolve(att, r)
    await c.wait_eof()


DISCONNECT_STAGES = ["connect", "greeting", "ehlo", "mid_command", "mail", "rcpt", "data",
                     "mid_body", "before_dot", "dot_only", "dot_cr", "after_dot", "after_quit"]


async def k_disconnect(c: Conn, rng: random.Random) -> None:
    stage = rng.choice(DISCONNECT_STAGES)
    how = rng.choice(["fin", "rst", "half"])
    c.s.sub = f"{stage}/{how}"
    if stage != "connect":
        await c.greet()
    if stage in ("connect", "greeting"):
        await c.close(how)
        return
    await hello(c, rng, extended=True)
    if stage == "mid_command":
        await c.send_raw(rng.choice([b"MAIL FROM:<a@exa", b"RCPT", b"NOOP", b"EH", b"DATA\r"]),
                         owes=0)
    if stage in ("ehlo", "mid_command"):
        await c.close(how)
        return
    await c.cmd(b"MAIL FROM:<disc@example.com>", "250")
    if stage == "mail":
        await c.close(how)
        return
    await c.cmd(b"RCPT TO:<r@example.org>", "250")
    if stage == "rcpt":
        await c.close(how)
        return
    await c.cmd(b"DATA", "354")
    if stage == "data":
        await c.close(how)
        return
    att, wire = c.message(rng.choice([500, 5000, 100000]))
    att.rcpts = 1
    cut = {"mid_body": rng.randrange(1, len(wire) - 3), "before_dot": len(wire) - 3,
           "dot_only": len(wire) - 2, "dot_cr": len(wire) - 1}.get(stage, len(wire))
    await c.send_body(att, wire[:cut])
    if stage == "after_quit":
        await c.data_end(att)
        await c.send_lines([b"QUIT"])
    await c.close(how)


async def k_slow(c: Conn, rng: random.Random) -> None:
    """Sessions the node has to end with its timeouts (few: each takes TIMEOUT)."""
    v = c.s.sub = ["idle_greeting", "idle_ehlo", "idle_mail", "mid_data", "mid_data",
                   "bare_cr", "partial_line", "starttls_garbage", "idle_greeting",
                   "mid_data"][c.s.sid % 10]
    await c.greet()
    if v != "idle_greeting":
        await hello(c, rng, extended=True)
    if v in ("idle_mail", "mid_data"):
        await c.cmd(b"MAIL FROM:<slow@example.com>", "250")
    if v == "mid_data":
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        att, wire = c.message(4000)
        await c.send_body(att, wire[:rng.randrange(1, len(wire) - 3)])
    elif v == "bare_cr":
        await c.send_raw(b"NOOP\rNOOP\r", owes=0)
    elif v == "partial_line":
        await c.send_raw(b"MAIL FROM:<slo", owes=0)
    elif v == "starttls_garbage":  # plaintext after STARTTLS in the same write: ignored
        c.s.tls = True
        await c.send_raw(b"STARTTLS\r\nNOOP\r\nGARBAGE\r\n", owes=1)
        c.check(await c.reply(), "220", b"STARTTLS")
    await c.wait_close()


AUTH_VARIANTS = ["no_mech", "bad_mech", "plain_not_b64", "plain_no_nul", "plain_wrong",
                 "plain_ok", "login_ok", "login_abort", "login_garbage", "plain_empty",
                 "too_many", "before_ehlo", "after_helo", "overlong_response", "login_binary",
                 "binary_mech", "plain_wrong"]


async def k_auth(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(AUTH_VARIANTS)
    if v == "before_ehlo":
        await c.cmd(b"AUTH PLAIN " + b64(b"\0alice\0s3cret"), "503")
        await c.quit()
        return
    await hello(c, rng, extended=v != "after_helo")
    ok = b"\0" + USER + b"\0" + PASSWORD
    steps: list[tuple[bytes, str]] = {
        "no_mech": [(b"AUTH", "501")],
        "bad_mech": [(b"AUTH " + rng.choice([b"CRAM-MD5", b"XOAUTH2", b"GSSAPI", b"X"]), "504")],
        "plain_not_b64": [(b"AUTH PLAIN !!not*base64", "501")],
        "plain_no_nul": [(b"AUTH PLAIN " + b64(b"alice s3cret"), "501")],
        "plain_wrong": [(b"AUTH PLAIN " + b64(b"\0alice\0" + text(rng, 8)), "535|454")],
        "plain_ok": [(b"AUTH PLAIN " + b64(ok), "235"), (b"AUTH PLAIN " + b64(ok), "503")],
        "login_ok": [(b"AUTH LOGIN", "334"), (b64(USER), "334"), (b64(PASSWORD), "235")],
        "login_abort": [(b"AUTH LOGIN", "334"), (b"*", "501")],
        "login_garbage": [(b"AUTH LOGIN", "334"), (b"!" + binary_line(rng)[:50], "501")],
        "plain_empty": [(b"AUTH PLAIN", "334"), (b"", "501")],
        "too_many": [(b"AUTH PLAIN a b c", "501")],
        "after_helo": [(b"AUTH PLAIN " + b64(ok), "500|503")],
        "login_binary": [(b"AUTH LOGIN " + b64(b"\xff\x00" + text(rng, 5)), "334"),
                         (b64(b"x"), "535|454")],
        "binary_mech": [(b"AUTH \x01\x02\xff", "504")],
        "overlong_response": [(b"AUTH PLAIN", "334")],
    }[v]
    for line, exp in steps:
        await c.cmd(line, exp)
    if v == "overlong_response":  # more than the line limit before its CRLF arrives
        c.s.auth_overlong = True
        n = rng.randint(1100, 200000)
        await c.send_raw(b"A" * 1100, owes=0)
        await asyncio.sleep(0.05)
        await c.send_lines([b"A" * (n - 1100)])
        c.check(await c.reply(), "501|500 5.5.2", b"<overlong AUTH response>")
        await c.cmd(b"NOOP", "250")
    if v in ("plain_ok", "login_ok"):
        await simple_transaction(c, rng)
    await c.quit()


async def k_starttls(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["arg", "garbage_after", "handshake", "handshake", "twice",
                              "before_ehlo", "partial_hello", "injection"])
    if v != "before_ehlo":
        await hello(c, rng, extended=rng.random() < 0.9)
    if v == "arg":
        await c.cmd(b"STARTTLS " + rng.choice([b"now", b"\x00", b"TLS1.3"]), "501")
        await c.cmd(b"NOOP", "250")
        await c.quit()
        return
    if v == "injection":  # commands pipelined after STARTTLS must be thrown away
        c.s.tls = True
        await c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nNOOP\r\n", owes=1)
        c.check(await c.reply(), "220", b"STARTTLS")
    else:
        c.s.tls = True
        await c.cmd(b"STARTTLS", "220")
    if v == "garbage_after":
        junk = bytes([rng.randrange(0x17, 256)]) + bytes(
            rng.randrange(256) for _ in range(rng.randint(20, 500)))
        await c.send_raw(junk, owes=0)
        await c.wait_close()
        return
    if v == "partial_hello":
        await c.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + text(rng, 20), owes=0)
        await c.close(rng.choice(["fin", "rst"]))
        return
    await c.start_tls()
    await hello(c, rng, extended=True)
    if v == "injection" or rng.random() < 0.6:  # an injected MAIL would make this one nested
        await simple_transaction(c, rng)
    if v == "twice":
        r = await c.cmd(b"STARTTLS", "220|454|503|554")
        if r.code == "220":  # a TLS layer inside TLS is more than this client does
            await c.close("fin")
            return
    await c.quit()


async def k_size(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    param, expect = rng.choice([
        (b"SIZE=1", "250"), (b"SIZE=0", "250"), (b"SIZE=%d" % rng.randint(2, 10**6), "250"),
        (b"SIZE=%d" % MAX_SIZE, "250"), (b"SIZE=%d" % (MAX_SIZE + 1), "552"),
        (b"SIZE=99999999999999999999999999999", "552"), (b"SIZE=-1", "501"),
        (b"SIZE=abc", "501"), (b"SIZE=", "501"), (b"SIZE", "501"), (b"SIZE=1e9", "501"),
        (b"SIZE=0x10", "501"), (b"SIZE=00000000000000000042", "250"),
        (b"SIZE=10 SIZE=20", "250"), (b"size=100", "250"), (b"SIZE=+5", "501"),
        (b"SIZE=\xb2", "501"), (b"SIZE=5 BODY=8BITMIME", "250"), (b"SIZE=5 BODY=9BIT", "501"),
    ])
    c.s.sub = param.decode("ascii", "replace")
    att, wire = c.message(rng.choice([100, 5000, 50000]))
    await transaction(c, rng, att, wire, mail=b"MAIL FROM:<size@example.com> " + param,
                      expect_mail=expect)
    await c.quit()


def _dots_wire(v: str, rng: random.Random, head: bytes) -> bytes:
    """The DATA wire of a "dots" session of variant ``v``."""
    if v == "stuffed":
        return stuff(head + body_lines(rng, rng.choice([200, 3000]), dots=0.5))
    elif v == "unstuffed":  # lines starting with a dot the client forgot to stuff
        return head + b"a\r\n.hidden\r\n..two\r\n.\t\r\nz\r\n.\r\n"
    elif v == "premature":  # a lone unstuffed dot ends the message; the rest are commands
        rest = rng.sample([b"NOOP", b"RSET", b"HELP", b"VRFY r@example.org"], rng.randint(1, 3))
        return head + b"first part\r\n.\r\n" + b"".join(r + b"\r\n" for r in rest) + b".\r\n"
    elif v == "near_terminators":
        fakes = [b"\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n .\r\n",
                 b"\r\n.\x00\r\n", b"\r\n..\r\n"]
        return head + b"x" + b"x".join(rng.sample(fakes, rng.randint(1, len(fakes)))) \
            + b"x\r\n.\r\n"
    elif v == "empty":
        return b".\r\n"
    elif v == "only_dots":
        return stuff(head + b"".join(b"." * rng.randint(1, 5) + b"\r\n" for _ in range(20)))
    elif v == "no_final_crlf":  # "abc.\r\n" is not an end of data: one more is needed
        return head + b"abc.\r\n" + b"\r\n.\r\n"
    elif v == "first_line_dot":
        return stuff(b".first line starts with a dot\r\n" + head)
    elif v == "dot_space":
        return head + b". \r\n.. \r\n . \r\n.\r\n"
    else:  # "split_terminator": the final CRLF.CRLF arrives byte by byte
        return stuff(head + b"body\r\n")


async def k_dots(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    v = c.s.sub = rng.choice(["stuffed", "unstuffed", "premature", "near_terminators", "empty",
                              "only_dots", "no_final_crlf", "first_line_dot", "split_terminator",
                              "dot_space"])
    await c.cmd(b"MAIL FROM:<dots@example.com>", "250")
    await c.cmd(b"RCPT TO:<r@example.org>", "250")
    await c.cmd(b"DATA", "354")
    marker = c.marker()
    head = headers(marker) + b"\r\n"
    wire = _dots_wire(v, rng, head)
    att = c.register(None if v in ("empty", "first_line_dot") else marker, wire)
    if v == "split_terminator":
        c.plan_body(att, wire)
        for piece in (wire[:-5], wire[-5:-4], wire[-4:-3], wire[-3:-2], wire[-2:-1], wire[-1:]):
            await c.write(piece)
            await asyncio.sleep(0.01)
    else:
        await c.send_body(att, wire)
    r = await c.data_end(att)
    if v == "premature" and r.code == "250":
        cut = split_at_terminator(wire)
        assert cut is not None
        for line in cut[1].split(b"\r\n")[:-1]:
            c.check(await c.reply(), "2|5", line)
    await c.quit()


def mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    lines = list(lines)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        line = lines[i]
        op = rng.randrange(9)
        pos = rng.randrange(len(line) + 1)
        if op == 0 and line:
            lines[i] = line[:pos] + bytes([rng.randrange(256)]) + line[pos + 1:]
        elif op == 1:
            lines[i] = line[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) \
                + line[pos:]
        elif op == 2:
            lines[i] = line[:pos] + line[pos + rng.randint(1, 8):]
        elif op == 3:
            lines.insert(i, line)
        elif op == 4:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 5:
            lines[i] = line.swapcase()
        elif op == 6:
            lines[i] = line[:pos] + rng.choice([b"\r", b"\n", b"\x00", b" ", b"\t"]) + line[pos:]
        elif op == 7:
            lines.insert(i, binary_line(rng))
        elif len(lines) > 1:
            del lines[i]
    return lines


async def k_mutate(c: Conn, rng: random.Random) -> None:
    await c.greet()
    marker = c.marker()
    content = f"X-Fuzz-Id: {marker}\r\nSubject: m\r\n\r\nbody\r\n".encode()
    lines = [b"EHLO mutant.example", b"MAIL FROM:<mut@example.com>", b"RCPT TO:<r@example.org>",
             *rng.sample([b"NOOP", b"RSET", b"VRFY r@example.org", b"HELP",
                          b"RCPT TO:<s@example.org>", b"MAIL FROM:<x@example.com>"], 2),
             b"DATA"]
    if rng.random() < 0.3:
        lines.insert(1, b"AUTH PLAIN " + b64(b"\0" + USER + b"\0" + PASSWORD))
    lines = mutate(rng, lines)
    eol = rng.choice([b"\r\n", b"\r\n", b"\n"])
    stream = b"".join(ln + eol for ln in lines) + stuff(content) + b"\r\n.\r\nQUIT\r\n"
    c.s.attempts.append(Attempt(marker, None, "", state="unread"))
    await c.send_raw(stream, owes=None)
    await c.wait_eof()


async def _repro_a(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"FOO\x00\rBAR", "500")


async def _repro_b_stored(c: Conn, rng: random.Random) -> None:
    # the 250 of a stored message goes down too
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"MAIL FROM:<a@example.com>", "250")
    await c.cmd(b"RCPT TO:<b@example.org>", "250")
    await c.cmd(b"DATA", "354")
    att, wire = c.message(300)
    att.rcpts = 1
    await c.send_body(att, wire + b"A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n", atomic=True)
    await c.data_end(att)
    for exp in ["500"] * 5 + ["250"]:  # under the limit: every reply comes
        c.check(await c.reply(), exp, b"<pipelined>")


async def _repro_b(c: Conn, rng: random.Random) -> None:
    await c.send_lines([b"EHLO x", b"A", b"B", b"C", b"D", b"E", b"F", b"NOOP"], atomic=True)
    for exp in ["250", "500", "500", "500", "500", "500|421", "500|421", "250|421"]:
        c.check(await c.reply(), exp, b"<pipelined>")


async def _repro_c(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"AUTH PLAIN", "334")
    c.s.auth_overlong = True
    await c.send_raw(b"A" * 1200, owes=0)
    await asyncio.sleep(0.1)
    await c.send_lines([b"A" * 1000])
    c.check(await c.reply(), "501|500 5.5.2", b"<overlong AUTH response>")
    await c.cmd(b"NOOP", "250")


async def _repro_d(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO \xff", "250")
    await simple_transaction(c, rng, 200)


async def _repro_e(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"MAIL FROM:<a@example.com>", "250")
    await c.cmd(b"RCPT TO:<b@example.org>", "250")
    await c.cmd(b"DATA", "354")
    att, wire = c.message(70000)
    att.rcpts = 1
    await c.send_body(att, wire)
    await c.send_lines([b"QUIT"])
    await c.close("half")


async def _repro_f(c: Conn, rng: random.Random) -> None:
    c.s.early_body = True
    await c.send_raw(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                     b"DATA\r\nSubject: x\r\n", owes=4, atomic=True)
    for exp in ["250", "250", "250", "354"]:
        c.check(await c.reply(), exp, b"<pipelined>")
    marker = c.marker()
    wire = headers(marker) + b"\r\nbody\r\n.\r\n"
    att = c.register(marker, b"Subject: x\r\n" + wire)
    await c.send_body(att, wire)
    await c.data_end(att)


async def _repro_g(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"MAIL FROM:<a@example.com> SIZE=\xc2\xb2", "250|501|552")


async def _repro_h(c: Conn, rng: random.Random) -> None:
    await c.cmd(b"EHLO x", "250")
    await c.cmd(b"MAIL FROM:<", "501")


async def _repro_i(c: Conn, rng: random.Random) -> None:
    # I: in one write, so that no other connection resets the shared limit meanwhile
    line = b"MAIL FROM:<" + b"a" * 700 + b"@example.com>"
    await c.send_lines([b"EHLO x"] * 31 + [line], atomic=True)
    for _ in range(31):
        c.check(await c.reply(), "250", b"EHLO x")
    c.check(await c.reply(), "500", line)


_REPROS: dict[str, Callable[[Conn, random.Random], Awaitable[None]]] = {
    "A": _repro_a,
    "B3": _repro_b_stored,
    "B": _repro_b,
    "C": _repro_c,
    "D": _repro_d,
    "E": _repro_e,
    "F": _repro_f,
    "G": _repro_g,
    "H": _repro_h,
    "I": _repro_i,
}


async def k_repro(c: Conn, rng: random.Random) -> None:
    """The minimal reproductions of FIXED_BUGS, each run every time."""
    bug = c.s.sub = "AABBCCDDEEEEEFFGGHHII"[c.s.sid % 21]
    await c.greet()
    # Session 3 of every 21 is the B whose pipelined 500s follow a stored message.
    await _REPROS["B3" if bug == "B" and c.s.sid % 21 == 3 else bug](c, rng)
    if bug != "E":  # E ends with a half-close: no QUIT
        await c.quit()


KINDS: dict[str, Callable[[Conn, random.Random], Awaitable[None]]] = {
    "slow": k_slow, "repro": k_repro, "valid": k_valid, "overlong": k_overlong,
    "overlong_mb": k_overlong_mb, "binary": k_binary, "line_endings": k_line_endings,
    "invalid_utf8": k_invalid_utf8, "huge": k_huge, "many_rcpts": k_many_rcpts,
    "out_of_order": k_out_of_order, "flood": k_flood, "disconnect": k_disconnect,
    "size": k_size, "auth": k_auth, "starttls": k_starttls, "dots": k_dots, "mutate": k_mutate,
}
