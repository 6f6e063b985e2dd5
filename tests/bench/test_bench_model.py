"""`z2all bench model` runs end to end on a toy size and prints the side-by-side table (numbers are not
asserted: throughput belongs to the benchmark, not to tests), with both models agreeing on loss and tokens;
`--out` writes the printed report and the resolved config with every round's time."""

from __future__ import annotations

import json
import re

from z2all.cli import main


def test_bench_model_prints_the_table(capsys, tmp_path):
    args = ["bench", "model", "--vocab-size", "300", "--batch-size", "1", "--seq-len", "16", "--train-rounds", "2",
            "--gen-prompt-len", "4", "--gen-new-tokens", "4", "--gen-rounds", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| workload" in out and "train step" in out and "generate, KV cache" in out
    assert len(re.findall(r"\d\.\d\dx", out)) == 2
    ours, theirs = re.search(r"ours ([\d.]+), transformers ([\d.]+)", out).groups()
    assert abs(float(ours) - float(theirs)) < 1e-3
    assert "greedy tokens identical: 4/4" in out and "medians (tokens/s)" in out
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["command"] == "z2all bench model" and saved["config"]["train_rounds"] == 2
    assert len(saved["rounds"]["train_step_s"]["ours"]) == len(saved["rounds"]["train_step_s"]["hf"]) == 2
    assert "| workload" in (tmp_path / "o" / "report.md").read_text()
