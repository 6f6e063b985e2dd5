"""Fault injection for `z2all bench data` (real CLI, subprocesses): bad options, corpora without documents
and a --work-dir holding a user's files all fail in one line before anything is written."""

from __future__ import annotations

from rel_helpers import assert_clean_failure, snapshot, z2all


def test_bench_data_refuses_bad_input_without_touching_files(tmp_path):
    empty = tmp_path / "corpora"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a corpus\n")
    assert_clean_failure(z2all("bench", "data", "--corpora", empty, "--size-mb", "1"), "no *.jsonl", "--corpora")
    assert_clean_failure(z2all("bench", "data", "--repeats", "0"), "repeats")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "big.jsonl").write_text("my own file\n")
    before = snapshot(mine)
    assert_clean_failure(z2all("bench", "data", "--work-dir", mine, "--size-mb", "1"), "--work-dir", "not empty")
    assert snapshot(mine) == before
