"""Several processes on CPU (gloo): two DDP processes end with the same parameters as one process with twice
the accumulation (same global batch), a DDP run resumes in one process, FSDP2 matches DDP, and the DDP
communication hooks (bf16 compression, PowerSGD) run and approximate the exact gradient average."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import TINY, load_weights, run_cli, run_inproc, train_losses, write_token_dir

from z2all.train import checkpoint as ckpt
from z2all.utils import UserError


def _same(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= atol, f"parameters differ by {diff}"
    return diff


def test_two_processes_equal_one_with_double_accumulation_and_resume_across_counts(tmp_path, capsys):
    tokens = write_token_dir(tmp_path / "tok")
    # the same schedule for every run, whatever its max_steps
    common = ["train", *TINY, f"--data.dir={tokens}", "--train.log_every=1", "--eval.every=0", "--optim.decay_steps=10"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    out = run_cli([*common, f"--out_dir={ddp}", "--train.max_steps=6", "--data.grad_accum=1"], nproc=2)
    assert "breaks down as: 1 grad accum steps * 2 processes * 4 batch size * 16 max seq len" in out.stdout
    assert run_inproc([*common, f"--out_dir={single}", "--train.max_steps=10", "--data.grad_accum=2",
                       "--ckpt.every=6"]) == 0

    # same global batch (8 sequences) split 2 x 1 or 1 x 2: same samples, same mean gradient
    want, got = train_losses(single), train_losses(ddp)
    assert got.keys() == set(range(1, 7))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6)
    _same(load_weights(ddp / "checkpoints/step-000006"), load_weights(single / "checkpoints/step-000006"), 1e-6)

    # the 2-process run continues in 1 process with accumulation 2 (global batch kept) and meets the single run
    assert run_inproc([*common, f"--out_dir={ddp}", "--train.max_steps=10", "--data.grad_accum=2",
                       "--resume=true"]) == 0
    assert "saved with 2 processes x 1 accumulation; now 1 x 2" in capsys.readouterr().out
    _same(load_weights(ckpt.latest_checkpoint(ddp)), load_weights(single / "checkpoints/step-000010"), 1e-5)
    # a changed global batch is refused with the value to use
    with pytest.raises(UserError, match="--data.grad_accum=2"):
        run_inproc([*common, f"--out_dir={ddp}", "--train.max_steps=12", "--resume=true"])


@pytest.mark.slow
def test_fsdp2_matches_ddp_and_resumes(tmp_path):
    tokens = write_token_dir(tmp_path / "tok")
    common = ["train", *TINY, f"--data.dir={tokens}", "--train.log_every=1", "--eval.every=0",
              "--optim.decay_steps=6"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_cli([*common, f"--out_dir={ddp}", "--train.max_steps=6", "--ckpt.every=4"], nproc=2)
    run_cli([*common, f"--out_dir={fsdp}", "--train.max_steps=4", "--dist.strategy=fsdp"], nproc=2)
    want, got = train_losses(ddp), train_losses(fsdp)
    assert [got[s] for s in range(1, 5)] == pytest.approx([want[s] for s in range(1, 5)], rel=1e-6)
    _same(load_weights(fsdp / "checkpoints/step-000004"), load_weights(ddp / "checkpoints/step-000004"), 1e-6)
    # the sharded optimizer state was gathered into the checkpoint and scattered back on resume
    run_cli([*common, f"--out_dir={fsdp}", "--train.max_steps=6", "--dist.strategy=fsdp", "--resume"], nproc=2)
    _same(load_weights(fsdp / "checkpoints/step-000006"), load_weights(ddp / "checkpoints/step-000006"), 1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hooks_worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all
    from z2all.train.distributed import DistConfig, all_gather_object, cleanup, init_distributed, wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results = {}
    for hook in ("none", "bf16", "powersgd"):
        torch.manual_seed(0)
        model = Z2all(model_preset("tiny", dim=64, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64))
        ref = copy.deepcopy(model)
        ddp = wrap_model(model, info, DistConfig(comm_hook=hook, powersgd_rank=4, powersgd_start_iter=2),
                         torch.float32)
        for it in range(3):  # PowerSGD all-reduces plainly for 2 iterations, then compresses
            x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(100 * it + rank))
            ddp.zero_grad()
            ref.zero_grad()
            ddp(x, x)[1].backward()
            ref(x, x)[1].backward()
        for p in ref.parameters():  # the exact fp32 average of the last iteration's gradients
            dist.all_reduce(p.grad)
            p.grad /= 2
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        r = torch.cat([p.grad.flatten() for p in ref.parameters()])
        same_on_ranks = all(torch.equal(g, o) for o in all_gather_object(g))
        results[hook] = {"same_on_ranks": same_on_ranks, "finite": bool(torch.isfinite(g).all()),
                         "cos": float(F.cosine_similarity(g, r, dim=0)),
                         "rel_err": float((g - r).norm() / r.norm())}
    # the best any rank-4 compression could do: each matrix of the exact average truncated to its top 4
    # singular values (vectors are all-reduced uncompressed by the hook)
    best = []
    for p in ref.parameters():
        if p.grad.ndim >= 2:
            U, S, Vh = torch.linalg.svd(p.grad.reshape(p.grad.shape[0], -1), full_matrices=False)
            best.append(((U[:, :4] * S[:4]) @ Vh[:4]).reshape(p.grad.shape).flatten())
        else:
            best.append(p.grad.flatten())
    b = torch.cat(best)
    results["rank4_svd"] = {"cos": float(F.cosine_similarity(b, r, dim=0)), "rel_err": float((b - r).norm() / r.norm())}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    cleanup()


def test_ddp_comm_hooks_run(tmp_path):
    out = tmp_path / "hooks.json"
    mp.spawn(_hooks_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    for hook in ("none", "bf16", "powersgd"):
        assert res[hook]["same_on_ranks"] and res[hook]["finite"], res
    assert res["none"]["rel_err"] < 1e-6
    assert 0 < res["bf16"]["rel_err"] < 1e-2  # bf16 rounding (8 mantissa bits), so not bit-exact
    # one compressed step at rank 4 (64-wide matrices, error feedback still empty) against the best rank-4
    # approximation (per-matrix SVD truncation of the exact average). It cannot beat that bound (it would if
    # the hook did not compress, or at a higher rank), and one power iteration from a random start gets most
    # of the way there (it would not if the hook returned noise or a stale/partial gradient). Measured, torch
    # 2.13 CPU: PowerSGD cos 0.575, rel_err 0.818; rank-4 SVD cos 0.708, rel_err 0.706.
    psgd, best = res["powersgd"], res["rank4_svd"]
    assert best["rel_err"] - 1e-4 <= psgd["rel_err"] <= 1.25 * best["rel_err"], res
    assert 0.75 * best["cos"] < psgd["cos"] <= best["cos"] + 1e-4, res
