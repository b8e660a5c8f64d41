"""mtactl as an operator types it: options after the verb, versions, token messages, a closed
pipe, user names the users file could not hold."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from mta.ingress.auth import UsersFile
from mta.node import Node

TOKEN = "s3cret-token"


async def _run(*argv: str, stdin: bytes | None = None, stdout: Any = asyncio.subprocess.PIPE,
               env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv, stdin=asyncio.subprocess.PIPE,
        stdout=stdout, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "MTACTL_URL": "", "MTACTL_TOKEN": "",
             **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    text_err = err.decode()
    assert "Traceback" not in text_err and "Exception ignored" not in text_err, text_err
    return proc.returncode, (out or b"").decode(), text_err


@pytest.fixture
async def node(start_node: Any) -> Node:
    return await start_node(admin={"token": TOKEN})


def _url(node: Node) -> str:
    assert node.admin is not None
    return f"http://127.0.0.1:{node.admin.port}"


async def test_global_options_work_after_the_verb_too(node: Node) -> None:
    code, out, err = await _run("mta.cli.ctl", "status", "--json", "--url", _url(node),
                                "--token", TOKEN)
    assert code == 0, err
    assert json.loads(out)["node"] == node.node_id
    # Before and after mixed: the one after the verb does not reset the one before.
    code, out, err = await _run("mta.cli.ctl", "--url", _url(node), "--json", "status",
                                "--token", TOKEN)
    assert code == 0, err
    assert json.loads(out)["node"] == node.node_id


async def test_status_shows_uptime_as_nodes_does(node: Node) -> None:
    code, out, err = await _run("mta.cli.ctl", "--url", _url(node), "--token", TOKEN, "status")
    assert code == 0, err
    [line] = [x for x in out.splitlines() if x.startswith("uptime")]
    assert re.fullmatch(r"uptime\s+(\d+(\.\d+)?s|\d+m\d\ds|\d+h\d\dm)", line), line


async def test_a_missing_token_is_told_apart_from_a_wrong_one(node: Node) -> None:
    code, _, err = await _run("mta.cli.ctl", "--url", _url(node), "status")
    assert code == 1
    assert err.startswith("mtactl: no token given, and ") and "--token" in err, err
    code, _, err = await _run("mta.cli.ctl", "--url", _url(node), "--token", "nope", "status")
    assert code == 1
    assert err.startswith("mtactl: token rejected by "), err


async def test_suspend_and_resume_say_what_they_did(node: Node) -> None:
    base = ("mta.cli.ctl", "--url", _url(node), "--token", TOKEN)
    code, out, err = await _run(*base, "suspend", "held.test")
    assert (code, out.strip()) == (0, "suspended held.test; suspended domains: held.test"), err
    code, out, err = await _run(*base, "resume", "held.test")
    assert (code, out.strip()) == (0, "resumed held.test; suspended domains: none"), err


async def test_a_reader_that_leaves_early_gets_no_traceback(node: Node) -> None:
    read, write = os.pipe()
    os.close(read)  # `mtactl queue | head` where head has already gone
    try:
        code, _, _ = await _run("mta.cli.ctl", "--url", _url(node), "--token", TOKEN,
                                "status", stdout=write)
    finally:
        os.close(write)
    assert code == 1


@pytest.mark.parametrize("prog", ["mta.cli.ctl", "mta.cli.daemon"])
async def test_version(prog: str) -> None:
    import mta

    code, out, err = await _run(prog, "--version")
    assert code == 0, err
    assert out.strip() == f"{'mtactl' if prog.endswith('ctl') else 'mta'} {mta.__version__}"


@pytest.mark.parametrize(("user", "says"), [
    ("", "empty"), ("a:b", "':'"), ("al ice", "spaces"), ("a\tb", "spaces"),
    ("#admin", "comment"), ("a\x7fb", "control"),
])
async def test_passwd_refuses_names_the_users_file_cannot_hold(user: str, says: str) -> None:
    code, out, err = await _run("mta.cli.ctl", "passwd", user, env={"MTA_PASSWORD": "pw"})
    assert (code, out) == (2, ""), (code, out, err)
    assert says in err and err.count("\n") == 1, err


async def test_passwd_reads_a_piped_password_and_ends_cleanly_without_one(
        tmp_path: Path) -> None:
    code, out, err = await _run("mta.cli.ctl", "passwd", "alice", stdin=b"pa55word\n")
    assert code == 0, err
    path = tmp_path / "users"
    path.write_text(out)
    users = UsersFile.load(str(path))
    assert "alice" in users and len(users) == 1
    assert await users.verify("alice", b"pa55word")  # the newline is not part of it
    code, out, err = await _run("mta.cli.ctl", "passwd", "alice", stdin=b"")
    assert (code, out) == (1, "")
    assert "no password read" in err


async def test_no_ops_say_so_and_fail(node: Node) -> None:
    base = ("mta.cli.ctl", "--url", _url(node), "--token", TOKEN)
    code, out, err = await _run(*base, "resume", "never.test")
    assert (code, out) == (1, "")
    assert err == ("mtactl: never.test is not suspended (HTTP 409); `mtactl throttle show` "
                   "lists the suspended domains\n"), err
    code, out, err = await _run(*base, "throttle", "clear", "never.test")
    assert (code, out) == (1, "")
    assert err.startswith("mtactl: no runtime throttle on never.test to clear (HTTP 409)"), err
    code, out, err = await _run(*base, "suspend", "not a domain!")
    assert (code, out) == (1, "")
    assert err.startswith("mtactl: not a domain: 'not a domain!'"), err
    # Real changes still work, and only the no-op is refused.
    code, _, err = await _run(*base, "throttle", "set", "busy.test", "5/s")
    assert code == 0, err
    code, _, err = await _run(*base, "throttle", "clear", "busy.test")
    assert code == 0, err
    assert node.coordinator.runtime().throttles == {}


async def test_passwd_refuses_an_empty_password() -> None:
    # `printf '\n' | mtactl passwd alice`: a line was read, and it is empty.
    for stdin in (b"\n", b"\r\n"):
        code, out, err = await _run("mta.cli.ctl", "passwd", "alice", stdin=stdin)
        assert (code, out) == (1, ""), (stdin, code, out, err)
        assert err == "mtactl: empty password refused\n", err


async def _queue_one(node: Node) -> str:
    """One message into the node's spool over SMTP (delivery is off: it stays); its id."""
    from tests.support import Raw, port, queued_id

    c = await Raw.connect(port(node))
    try:
        assert (await c.reply()).startswith("220")
        assert (await c.cmd("EHLO client.example")).startswith("250")
        assert (await c.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        return queued_id(await c.cmd(b"Subject: hi\r\n\r\nhello\r\n."))
    finally:
        await c.close()


async def test_an_option_between_the_verb_and_its_id_is_taken(node: Node) -> None:
    mid = await _queue_one(node)
    code, out, err = await _run("mta.cli.ctl", "--url", _url(node), "message", "show",
                                "--token", TOKEN, mid)
    assert code == 0, err
    assert out.startswith(f"id           {mid}"), out
    code, out, err = await _run("mta.cli.ctl", "message", "show", "--url", _url(node),
                                "--json", "--token", TOKEN, mid, "--headers")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["id"] == mid and "Subject: hi" in shown["content"]["text"], shown
