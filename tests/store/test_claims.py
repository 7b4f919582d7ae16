"""postquant.store.claims: a claim is held by a live process; one left by a dead process is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from postquant.store.claims import Claims, SharedLock, alive, process_start, this_process


def _holder(pid: int) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


@pytest.fixture
def claims(tmp_path) -> Claims:
    return Claims(tmp_path / "work.claims", SharedLock(tmp_path / "work.lock"))


def test_a_live_process_is_told_from_a_dead_or_reused_pid(other_process):
    me = this_process()
    assert alive(me) and alive(_holder(other_process.pid))
    assert not alive({**me, "start": "0"})  # the pid now belongs to a process started later
    assert alive({**me, "host": "another-host"})  # cannot be checked: honoured
    other_process.kill()
    other_process.wait()
    assert not alive({**me, "pid": other_process.pid, "start": None})
    assert not alive({**me, "pid": 0})
    assert not alive({**me, "pid": 2**62})  # no such pid


def test_a_killed_process_not_yet_reaped_is_dead(other_process):
    holder = _holder(other_process.pid)
    other_process.kill()  # a zombie until the fixture waits for it
    import time

    deadline = time.monotonic() + 10
    while alive(holder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(holder)


def test_a_key_held_by_another_live_process_is_refused_and_taken_over_once_it_dies(claims, other_process):
    claims.path.write_text(json.dumps({"layer1": _holder(other_process.pid)}))
    assert claims.held_elsewhere("layer1")
    assert not claims.take("layer1")
    assert claims.take("layer2")  # another key is free
    other_process.kill()
    other_process.wait()
    assert not claims.held_elsewhere("layer1")
    assert claims.take("layer1")  # a stale claim: taken over
    assert claims.holders() == {"layer1": this_process(), "layer2": this_process()}


def test_a_claim_left_by_a_process_that_exited_is_taken_over(claims):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(done.stdout)
    claims.path.write_text(json.dumps({"run": {"host": socket.gethostname(), "pid": pid, "start": "1"}}))
    assert claims.take("run")
    assert claims.holders()["run"] == this_process()


def test_release_drops_only_this_processs_claims(claims, other_process):
    theirs = _holder(other_process.pid)
    claims.path.write_text(json.dumps({"a": theirs}))
    assert claims.take("b") and claims.take("c")
    claims.release(["b", "a"])  # "a" is not ours: kept
    assert claims.holders() == {"a": theirs, "c": this_process()}
    claims.release()
    assert claims.holders() == {"a": theirs}


def test_a_hand_edited_claims_file_is_ignored_with_a_warning(claims, caplog):
    claims.path.write_text("{not json")
    assert claims.holders() == {}
    assert "not valid JSON" in caplog.text
    assert claims.take("a") and claims.holders() == {"a": this_process()}


def test_the_lock_is_reentrant_and_creates_its_folder(tmp_path):
    lock = SharedLock(tmp_path / "new" / "dir" / "t.lock")
    with lock.held(), lock.held():  # a nested block does not wait for itself
        assert (tmp_path / "new" / "dir").is_dir()


def test_claims_and_tables_import_where_there_is_no_fcntl():
    """Windows has no fcntl: the store must not import it itself (filelock picks the platform's lock)."""
    code = "import sys; sys.modules['fcntl'] = None; import postquant.store.claims, postquant.store.table"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
