"""A shard copy's id (mta.spool.copyid): stable across opens, new with a new disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mta.replication.copy import ShardCopy
from mta.spool.copyid import COPY_FILE, copy_id


def test_a_copy_keeps_its_id_and_a_new_disk_gets_another(tmp_path: Path) -> None:
    first = ShardCopy.open(tmp_path, 3)
    assert len(first.copy_id) == 32
    first.close()
    again = ShardCopy.open(tmp_path, 3)
    assert again.copy_id == first.copy_id
    again.close()
    shutil.rmtree(tmp_path / "shard-003")  # the disk is replaced
    fresh = ShardCopy.open(tmp_path, 3)
    assert fresh.copy_id != first.copy_id
    fresh.close()


def test_an_unreadable_id_is_replaced_never_kept(tmp_path: Path) -> None:
    (tmp_path / COPY_FILE).write_text("not-an-id\n")
    made = copy_id(tmp_path)
    assert made != "not-an-id" and (tmp_path / COPY_FILE).read_text().strip() == made
    assert copy_id(tmp_path) == made
    assert not list(tmp_path.glob("*.tmp"))


def test_openers_racing_on_an_empty_directory_agree(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from mta.spool.copyid import copy_id; "
            "print(copy_id(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    ids = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert ids == {copy_id(tmp_path)}
