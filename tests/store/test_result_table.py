"""postquant.store.table: a JSON table of results that processes share and an interrupted run resumes."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys

import pytest

from postquant.errors import CheckpointError, DataError, OutputError
from postquant.store.claims import process_start, this_process
from postquant.store.table import HeaderedRows, ListedRows, ResultTable
from tests.store.store_workers import append_rows, work_through


def test_rows_are_written_at_once_and_read_back(tmp_path):
    path = tmp_path / "out" / "results.json"
    table = ResultTable(path)
    assert len(table) == 0 and not path.parent.exists()  # nothing written until the first row
    table.put("b", {"value": 1.5})
    table.put("a", {"value": 2.0})
    assert json.loads(path.read_text()) == {"b": {"value": 1.5}, "a": {"value": 2.0}}
    again = ResultTable(path)
    assert again.rows == table.rows and "a" in again and again.get("c") is None
    assert again.missing(["a", "c", "b", "c", "d"]) == ["c", "d"]  # in order, each once


def test_a_table_object_that_read_long_ago_loses_no_row(tmp_path):
    path = tmp_path / "results.json"
    stale, other = ResultTable(path), ResultTable(path)
    other.put("theirs", 1)
    stale.put("mine", 2)  # re-read under the lock before writing
    assert json.loads(path.read_text()) == {"theirs": 1, "mine": 2}
    assert stale.rows == {"theirs": 1, "mine": 2}


def test_reading_a_table_writes_nothing(tmp_path):
    (tmp_path / "results.json").write_text('{"a": 1}')
    table = ResultTable(tmp_path / "results.json")
    table.refresh()
    assert table.rows == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_listed_table_keeps_its_file_a_list(tmp_path):
    path = tmp_path / "learned.json"
    path.write_text(json.dumps([{"model": "m", "method": "rtn", "value": 1.0}], indent=1))
    table = ResultTable(path, layout=ListedRows(lambda r: f"{r['model']}|{r['method']}"))
    assert "m|rtn" in table
    table.put("m|squant", {"model": "m", "method": "squant", "value": 2.0})
    table.put("m|rtn", {"model": "m", "method": "rtn", "value": 3.0})  # replaced in place
    assert json.loads(path.read_text()) == [
        {"model": "m", "method": "rtn", "value": 3.0},
        {"model": "m", "method": "squant", "value": 2.0},
    ]


def test_a_headered_table_merges_rows_and_refuses_another_configuration(tmp_path):
    path = tmp_path / "importance_abc.json"
    widen = {
        "layout": HeaderedRows({"key": "abc"}),
        "merge": lambda old, new: {**old, **new},
        "sort_keys": True,
    }
    table = ResultTable(path, **widen)
    table.put("conv1", {"2": 0.5})
    table.put("conv1", {"4": 0.1})
    assert json.loads(path.read_text()) == {"key": "abc", "rows": {"conv1": {"2": 0.5, "4": 0.1}}}
    with pytest.raises(
        CheckpointError, match=r"not a readable importance table \(it holds key 'abc'\); delete it"
    ):
        ResultTable(
            path,
            layout=HeaderedRows({"key": "xyz"}),
            what="importance table",
            damaged_hint="delete it",
            damaged_error=CheckpointError,
        )


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"rows"'], ids=["not-json", "a-list", "a-string"])
def test_a_damaged_table_is_a_clear_error(tmp_path, text):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(DataError, match=r"results\.json is not a readable results table .*move it away"):
        ResultTable(tmp_path / "results.json")


def test_an_unwritable_table_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("")
    table = ResultTable(tmp_path / "file" / "results.json", writable_hint="choose a writable --out")
    with pytest.raises(OutputError, match=r"cannot write .*results\.json: .*; choose a writable --out"):
        table.put("a", 1)


def test_todo_skips_what_is_done_and_what_others_work_on(tmp_path):
    table = ResultTable(tmp_path / "results.json")
    table.put("a", 1)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        holder = {"host": socket.gethostname(), "pid": other.pid, "start": process_start(other.pid)}
        table.claims.path.write_text(json.dumps({"b": holder}))
        seen = []
        for key in table.todo(["a", "b", "c", "d"]):
            assert table.claims.holders()[key] == this_process()  # claimed while being worked on
            seen.append(key)
            table.put(key, 2)
        assert seen == ["c", "d"]
        assert table.claims.holders() == {"b": holder}  # ours released
        other.kill()
        other.wait()
        assert list(table.todo(["a", "b", "c", "d"])) == ["b"]  # its process died: taken over
    finally:
        other.kill()
        other.wait()


def test_an_interrupted_loop_resumes_at_the_first_missing_row(tmp_path):
    keys = [f"row{i}" for i in range(5)]
    table = ResultTable(tmp_path / "results.json")
    with pytest.raises(KeyboardInterrupt):
        for key in table.todo(keys):
            if key == "row3":
                raise KeyboardInterrupt
            table.put(key, {"done": True})
    resumed = ResultTable(tmp_path / "results.json")
    assert list(resumed.todo(keys)) == ["row3", "row4"]


def test_two_processes_appending_to_one_table_lose_no_row(tmp_path):
    path, workers, n = tmp_path / "results.json", 3, 25
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=append_rows, args=(str(path), w, n, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    rows = json.loads(path.read_text())
    assert sorted(rows) == sorted(f"w{w}-{i:03d}" for w in range(workers) for i in range(n))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_two_processes_split_the_rows_left_and_do_each_once(tmp_path):
    path, keys = tmp_path / "results.json", [f"k{i:02d}" for i in range(30)]
    ctx = multiprocessing.get_context("spawn")
    barrier, did = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=work_through, args=(str(path), w, keys, barrier, did)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    done = [did.get(timeout=5) for _ in keys]
    assert sorted(key for _, key in done) == keys  # every key, each by one process
    assert {worker for worker, _ in done} == {0, 1}  # both took a share
    assert sorted(json.loads(path.read_text())) == keys
    assert json.loads(table_claims(path).read_text()) == {}  # no claim left behind


def table_claims(path):
    return path.with_name(path.name + ".claims")
