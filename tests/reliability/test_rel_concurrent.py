"""Two z2all processes on one output directory: the second is refused in one line naming the first (its
command and pid), whatever it is (a fresh start, a resume), and the first finishes exactly as it would have
alone; once the first has exited the directory is free again. Before io.dir_lock both ran, both exited 0,
and the run directory held a mix of the two runs' checkpoints and metrics. The data commands hold their
--out the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rel_helpers import assert_clean_failure, z2all

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import TINY, write_token_dir  # noqa: E402

from z2all.io import LOCK_FILE  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}


def test_a_second_run_on_a_run_directory_in_use_is_refused(tmp_path):
    tokens = write_token_dir(tmp_path / "tok")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "z2all", "train", *TINY, "--train.log_every=1", "--eval.every=0",
            "--ckpt.every=50", f"--data.dir={tokens}", f"--out_dir={run}"]
    env = {**os.environ, "Z2ALL_NO_PROGRESS": "1", **ENV}
    log = open(tmp_path / "first.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    first = subprocess.Popen([*args, "--train.max_steps=100000", "--train.time_budget_s=60"], env=env,
                             stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():  # training has started: the lock is held
            assert first.poll() is None and time.monotonic() < end, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        assert f"pid {first.pid}" in (run / LOCK_FILE).read_text()
        for extra in ([], ["--resume"]):
            line = assert_clean_failure(z2all("train", *args[4:], "--train.max_steps=5", *extra, env=ENV),
                                        "--out_dir", "is being written by `z2all train`", f"pid {first.pid}")
            assert "nothing was changed" in line
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: the run saves a checkpoint and exits 130
        first.wait(60)
        log.close()
    assert not (run / LOCK_FILE).exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps)), "two runs wrote metrics.jsonl"
    res = z2all("train", *args[4:], f"--train.max_steps={max(steps) + 2}", "--resume", env=ENV)
    assert res.rc == 0, res.text[-3000:]  # free again once the first run has gone


def test_the_data_commands_refuse_an_output_another_process_is_writing(tmp_path, capsys, lock_holder):
    """data convert, tokenize, chat and prefs hold --out the same way (io.dir_lock at the start of run):
    with another process holding it, each is refused in one line naming that process, and the directory
    is left as it was."""
    from z2all import cli

    out = tmp_path / "out"
    holder = lock_holder(out, "data convert")
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    for argv in (["data", "convert", "--inputs", f"wikipedia_en={tmp_path / 'in.jsonl'}"],
                 ["data", "tokenize", "--shards", str(tmp_path), "--tokenizer", str(tmp_path)],
                 ["data", "chat", "--inputs", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path)],
                 ["data", "prefs", "--inputs", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path)]):
        assert cli.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert f"is being written by `z2all data convert` (pid {holder.pid})" in err, (argv, err)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
