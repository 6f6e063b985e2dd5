"""`z2all bench ablation`: the rows of the seed's table, and the CPU fallback that runs the reference rows
(the GPU rows print n/a) through the training loop's forward_backward."""

from __future__ import annotations

import pytest
import torch

from z2all.bench import ablation


def test_rows_are_the_seeds_table():
    names = [n for n, _, _ in ablation.row_specs()]
    assert names[:3] == ["naive", "sdpa", "use_all"] and names[-1] == "use_all + compile"
    assert {n for n in names if "w/o" in n} == {f"use_all w/o {op}" for op in
                                                ("rmsnorm", "rope", "swiglu", "attention", "cross_entropy")}
    specs = {n: (ops, c) for n, ops, c in ablation.row_specs()}
    assert specs["use_all w/o attention"][0]["attention"] == "naive"
    assert specs["use_all w/o rope"][0] == {"rmsnorm": "triton", "rope": "torch", "swiglu": "triton",
                                            "attention": "triton", "cross_entropy": "triton"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only runs without a GPU")
def test_cpu_fallback_runs_reference_rows(capsys):
    cfg = ablation.Config(rows=["naive", "sdpa", "use_all"], iters=1, vocab_size=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 spinning OpenMP threads on 2 shared cores can be 10x slower
    try:
        assert ablation.run(cfg) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "no CUDA GPU here" in out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "n/a (GPU)" in lines["use_all"]
    naive, sdpa = (float(lines[r].split("|")[6]) for r in ("naive", "sdpa"))
    assert naive == pytest.approx(sdpa, abs=1e-3)  # same model, same batches: attention impl does not change loss


def test_unknown_row_is_a_user_error():
    from z2all.utils import UserError

    with pytest.raises(UserError, match="unknown row"):
        ablation.run(ablation.Config(rows=["nope"]))
