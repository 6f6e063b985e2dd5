"""`z2all dpo` (train/dpo.py): the loss and its gradient against hand-computed values on a 2-token toy (sigmoid,
conservative, IPO); a few steps on a handful of pairs raise the reward margin and accuracy (overfit); a run killed
with SIGKILL resumes with identical losses; precomputed reference log-probs equal the live reference model's; with
LoRA only the adapters train, checkpoints hold only them and the reference is the base without adapters; a resume
with other DPO settings or another --init is refused in one line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sft_helpers import make_sft_inputs
from train_helpers import REPO, assert_damaged_data_refused, cli_env, load_weights, train_losses

from z2all.train import checkpoint as ckpt
from z2all.train.dpo import dpo_loss, sequence_logps

Z2ALL = ["-m", "z2all"]  # the real CLI, also under torchrun
TINY = ["--data.batch_size=4", "--eval.max_batches=2", "--metrics.tensorboard=false", "--device=cpu",
        "--optim.warmup_steps=2", "--optim.lr=3e-3", "--optim.min_lr=3e-4", "--threads=1", "--train.log_every=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from z2all.data import prefs

    root = tmp_path_factory.mktemp("dpo")
    got = make_sft_inputs(root, n=200)
    recs = [json.loads(x) for x in (got["synth"] / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = prefs.synthetic_pairs(recs)
    for name, chosen, frac in (("prefs", pairs, 0.15), ("few", pairs[:8], 0.0)):
        f = root / f"{name}.jsonl"
        f.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in chosen), encoding="utf-8")
        prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(got["tok"]), out=str(root / name), val_fraction=frac,
                               max_len=128))
        got[name] = root / name
    return got


def dpo_args(inputs, out: Path, *extra: str, data: str = "prefs") -> list[str]:
    return ["dpo", f"--init={inputs['base']}", f"--data.dir={inputs[data]}", f"--out_dir={out}", *TINY, *extra]


def run_inproc(args: list[str]) -> int:
    from z2all import cli

    return cli.main(args)


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_loss_and_gradient_on_a_two_token_toy():
    # vocab {0, 1}; chosen = [0, 1], rejected = [0, 0]; only the second token is a response token. The policy's
    # logits after token 0 are z; the reference's are 0 (log p = log 1/2 for both), so h = z1 - z0.
    z = torch.tensor([0.3, -0.2], requires_grad=True)
    ids = torch.tensor([[0, 1], [0, 0]])
    mask = torch.tensor([[False, True], [False, True]])
    beta = 0.5
    for kind, eps, want_loss, want_dz1 in [
        ("sigmoid", 0.0, math.log1p(math.exp(0.25)), -beta / (1 + math.exp(-0.25))),           # -log s(-0.25)
        ("sigmoid", 0.1, 0.9 * math.log1p(math.exp(0.25)) + 0.1 * math.log1p(math.exp(-0.25)),
         -beta * (0.9 / (1 + math.exp(-0.25)) - 0.1 / (1 + math.exp(0.25)))),
        ("ipo", 0.0, (-0.5 - 1.0) ** 2, 2 * (-0.5 - 1.0)),
    ]:
        z.grad = None
        logits = torch.stack([torch.stack([z, torch.zeros(2)])] * 2)  # [2 rows, 2 positions, 2 ids]
        lp = sequence_logps(logits, ids, mask)
        ref = sequence_logps(torch.zeros(2, 2, 2), ids, mask)
        assert ref.tolist() == pytest.approx([math.log(0.5)] * 2)
        loss, rw, rl = dpo_loss(lp[:1], lp[1:], ref[:1], ref[1:], beta, kind, eps)
        loss.sum().backward()
        assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-6), kind
        assert float(z.grad[1]) == pytest.approx(want_dz1, rel=1e-5), kind
        assert float(z.grad[0]) == pytest.approx(-want_dz1, rel=1e-5), kind  # log-softmax: dz0 = -dz1 here
        assert float(rw - rl) == pytest.approx(beta * -0.5, rel=1e-6)
    assert math.log1p(math.exp(0.25)) == pytest.approx(0.8259394, rel=1e-6)  # the value written out


def test_a_few_steps_overfit_a_handful_of_pairs(inputs, tmp_path):
    out = tmp_path / "run"
    assert run_inproc(dpo_args(inputs, out, "--train.max_steps=30", "--dpo.beta=0.5", data="few")) == 0
    train = records(out, "train")
    assert train[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is the reference
    assert train[0]["dpo_acc"] == 0.0
    last = train[-5:]
    assert sum(r["dpo_acc"] for r in last) / 5 >= 0.9
    assert min(r["dpo_margin"] for r in last) > 0.5
    assert train[-1]["loss"] < train[0]["loss"] * 0.5
    assert (out / "reference" / "train.npy").is_file()  # full fine-tuning: precomputed by default


def test_precomputed_reference_equals_live_and_eval_is_logged(inputs, tmp_path):
    from z2all.data.prefs import PrefData
    from z2all.model.llama import load_model
    from z2all.train.dpo import PairBatches, reference_logps

    torch.set_num_threads(1)
    pre, live = tmp_path / "pre", tmp_path / "live"
    common = ["--train.max_steps=4", "--eval.every=2"]
    assert run_inproc(dpo_args(inputs, pre, *common, "--dpo.reference=precomputed")) == 0
    assert run_inproc(dpo_args(inputs, live, *common, "--dpo.reference=live")) == 0
    import numpy as np

    model = load_model(inputs["base"])
    for split in ("train", "val"):
        table = np.load(pre / "reference" / f"{split}.npy")
        b = PairBatches(PrefData(inputs["prefs"], split), split, batch_size=3, shuffle=False)
        batch = b.collate(list(range(min(b.n, 9))))
        c, r = reference_logps(model, batch, torch.device("cpu"))
        np.testing.assert_allclose(table[batch.pairs], torch.stack([c, r], 1).double().numpy(), atol=1e-4)
    a, b = train_losses(pre), train_losses(live)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], abs=1e-5)
    ev = records(pre, "sample")
    assert [r["step"] for r in ev] == [2, 4] and all(0 <= r["val_dpo_acc"] <= 1 for r in ev)
    assert {"val_dpo_margin", "val_logp_chosen", "val_logp_rejected"} <= set(ev[0])


def test_val_loss_is_the_mean_over_val_pairs_logged_once_without_ppl(inputs, tmp_path):
    """At an evaluation the "val" record's val_loss is the DPO loss averaged over every val pair (batches of 4
    pairs, the last one smaller, weighted by their pairs), computed directly here from the checkpoint of that
    step; the "sample" record carries the other val metrics but no second val_loss (it was a different
    number: 0.2909 against 0.2779), and there is no val_ppl (exp of a preference loss is no perplexity)."""
    from z2all.data.prefs import PrefData
    from z2all.model.llama import load_model
    from z2all.train.dpo import PairBatches, policy_logps, reference_logps

    torch.set_num_threads(1)
    out = tmp_path / "run"
    val = PrefData(inputs["prefs"], "val")
    assert len(val) % 4, "the last val batch should be smaller, or batch means would weigh pairs alike"
    assert run_inproc(dpo_args(inputs, out, "--train.max_steps=4", "--eval.every=0", "--eval.max_batches=1000",
                               "--optim.lr=3e-2", "--dpo.reference=precomputed")) == 0
    [rec] = records(out, "val")
    [sample] = records(out, "sample")
    assert rec["step"] == sample["step"] == 4
    assert "val_ppl" not in rec and "val_loss" not in sample and 0 <= sample["val_dpo_acc"] <= 1

    pairs = PairBatches(val, "val", batch_size=len(val), shuffle=False).collate(list(range(len(val))))
    device = torch.device("cpu")
    with torch.no_grad():
        rc, rr = reference_logps(load_model(inputs["base"]), pairs, device)
        pc, pr = policy_logps(load_model(ckpt.latest_checkpoint(out)).eval(), pairs, device)
    losses = dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0)[0]
    assert rec["val_loss"] == pytest.approx(float(losses.mean()), rel=1e-4)
    assert float(losses.std()) > 1e-3  # the pairs' losses differ: a mean of batch means would not match


def test_sigkill_then_resume_matches_uninterrupted(inputs, tmp_path, capsys):
    steps = 60
    common = [f"--train.max_steps={steps}", "--ckpt.every=5", "--ckpt.keep_last=1", "--eval.every=30"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_inproc(dpo_args(inputs, ref, *common)) == 0
    proc = subprocess.Popen([sys.executable, *Z2ALL, *dpo_args(inputs, killed, *common)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-000010"
    deadline = time.time() + 180
    while time.time() < deadline and not target.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; lengthen it"
    at = ckpt.read_state(ckpt.latest_checkpoint(killed))["next_step"]
    assert 10 <= at < steps
    assert run_inproc([*dpo_args(inputs, killed, *common), "--resume=true"]) == 0
    assert "resumed from" in capsys.readouterr().out
    want, got = train_losses(ref), train_losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]  # bit for bit
    a, b = load_weights(ckpt.latest_checkpoint(ref)), load_weights(ckpt.latest_checkpoint(killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_dpo_settings_or_another_init(inputs, tmp_path, capsys):
    import shutil

    from z2all.model.llama import load_model, save_model

    out = tmp_path / "run"
    common = ["--ckpt.every=2", "--eval.every=0", "--dpo.beta=0.5"]
    assert run_inproc(dpo_args(inputs, out, *common, "--train.max_steps=2", data="few")) == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    # the loss would change meaning within one metrics.jsonl: refused, naming the run's values
    assert run_inproc([*dpo_args(inputs, out, *common, "--train.max_steps=4", data="few"), "--dpo.beta=0.9",
                       "--dpo.loss=ipo", "--resume=true"]) == 2
    err = capsys.readouterr().err
    assert "--dpo.beta=0.5 --dpo.loss=sigmoid, now --dpo.beta=0.9 --dpo.loss=ipo" in err, err
    assert "--out_dir" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # another starting policy would silently become another reference: refused, naming the run's --init
    other = tmp_path / "other"
    model = load_model(inputs["base"])
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(1.5)
    save_model(model, other)
    shutil.copytree(inputs["base"] / "tokenizer", other / "tokenizer")
    args = [a if not a.startswith("--init=") else f"--init={other}"
            for a in dpo_args(inputs, out, *common, "--train.max_steps=4", data="few")]
    assert run_inproc([*args, "--resume=true"]) == 2
    err = capsys.readouterr().err
    assert f"--init {inputs['base']}" in err and f"now --init {other}" in err and "Traceback" not in err, err
    assert (out / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]

    # the same weights in another place, and the options that may change (length, intervals, how the reference
    # log-probs are obtained): the resume continues
    moved = tmp_path / "moved"
    shutil.copytree(inputs["base"], moved)
    args = [a if not a.startswith("--init=") else f"--init={moved}"
            for a in dpo_args(inputs, out, *common, "--train.max_steps=4", "--ckpt.every=3", data="few")]
    assert run_inproc([*args, "--dpo.reference=live", "--resume=true"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


def test_lora_dpo_trains_adapters_only_with_the_base_as_reference(inputs, tmp_path, capsys):
    from z2all.model.llama import load_model
    from z2all.model.lora import LoraLinear

    out = tmp_path / "lora"
    common = ["--train.max_steps=8", "--lora.rank=4", "--lora.targets=all", "--optim.lr=1e-2", "--ckpt.every=4",
              "--eval.every=0", "--dpo.beta=0.5"]
    assert run_inproc(dpo_args(inputs, out, *common, data="few")) == 0
    log = capsys.readouterr().out
    assert "the base without adapters (no copy)" in log and "trainable" in log
    assert not (out / "reference").exists()  # LoRA: live reference, nothing precomputed
    last = ckpt.latest_checkpoint(out)
    w = load_weights(last)
    assert w and all(k.endswith(("lora_A", "lora_B")) for k in w)
    opt = torch.load(last / "optimizer.pt", weights_only=False)
    assert set(opt["state"]) == set(w)
    base_size = (inputs["base"] / "model.safetensors").stat().st_size
    assert (last / "model.safetensors").stat().st_size < base_size / 2
    train = records(out, "train")
    assert train[-1]["dpo_margin"] > train[0]["dpo_margin"]
    merged = load_model(last)  # the adapter checkpoint loads merged, onto the recorded base
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    base = load_model(inputs["base"])
    assert not torch.equal(merged.layers[0].attention.wq.weight, base.layers[0].attention.wq.weight)
    assert torch.equal(merged.tok_embeddings.weight, base.tok_embeddings.weight)
    # resume continues the adapters; changing the LoRA setup is refused
    assert run_inproc([*dpo_args(inputs, out, *common, data="few"), "--train.max_steps=10", "--resume=true"]) == 0
    assert run_inproc([*dpo_args(inputs, out, *common, data="few"), "--lora.rank=8", "--train.max_steps=12",
                       "--resume=true"]) == 2
    assert "--lora.rank=4" in capsys.readouterr().err


def test_bad_options_are_refused_in_one_line(inputs, tmp_path, capsys):
    cases = [(["--dpo.beta=0"], "--dpo.beta=0"), (["--dpo.loss=ipo", "--dpo.label_smoothing=0.1"], "sigmoid only"),
             (["--lora.rank=-2"], "--lora.rank=-2"), (["--lora.rank=2", "--lora.targets=qq"], "unknown layer")]
    for extra, pat in cases:
        assert run_inproc(dpo_args(inputs, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err
        assert pat in err and "Traceback" not in err
    assert run_inproc(["dpo", f"--init={inputs['base']}", f"--data.dir={inputs['chat']}",
                       f"--out_dir={tmp_path / 'y'}", *TINY]) == 2
    assert "z2all data prefs" in capsys.readouterr().err


def test_lora_sft_checkpoints_only_adapters_and_trains(inputs, tmp_path, capsys):
    from sft_helpers import sft_args

    from z2all.model.llama import load_model

    out = tmp_path / "sft-lora"
    args = [*sft_args(inputs, out, "--train.max_steps=10", "--eval.every=0", "--train.log_every=1"), "--lora.rank=4",
            "--lora.targets=all", "--optim.lr=1e-2"]
    assert run_inproc(args) == 0
    assert "LoRA rank 4 on all" in capsys.readouterr().out
    last = ckpt.latest_checkpoint(out)
    w = load_weights(last)
    assert w and all(k.endswith(("lora_A", "lora_B")) for k in w)
    assert set(torch.load(last / "optimizer.pt", weights_only=False)["state"]) == set(w)
    train = records(out, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert load_model(last).cfg.dim == load_model(inputs["base"]).cfg.dim


def test_demo_functions_preference_and_exact_match_from_checkpoints(inputs, tmp_path):
    from z2all.bench.finetune import exact_match_eval, preference_eval

    out = tmp_path / "run"
    assert run_inproc(dpo_args(inputs, out, "--train.max_steps=20", "--dpo.beta=0.5", data="few")) == 0
    before = preference_eval(inputs["base"], inputs["few"], reference=inputs["base"], split="train", beta=0.5)
    after = preference_eval(out, inputs["few"], reference=inputs["base"], split="train", beta=0.5)
    assert before["pairs"] == after["pairs"] >= 4
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6) and before["reward_acc"] == 0.0
    assert after["reward_acc"] >= 0.75 and after["reward_margin"] > 0.5
    assert after["logp_margin"] > before["logp_margin"]
    recs = [json.loads(x) for x in (inputs["synth"] / "heldout.jsonl").read_text(encoding="utf-8").splitlines()][:3]
    em = exact_match_eval(out, recs, max_new_tokens=4)
    assert 0.0 <= em["all"] <= 1.0 and set(em) >= {"all", recs[0]["task"]}


@pytest.mark.slow
def test_bench_finetune_rows(tmp_path, capsys):
    from z2all.bench.finetune import Config, run

    assert run(Config(n=300, steps=3, batch_size=4, dim=32, n_layers=2, n_heads=2, threads=1,
                      out=str(tmp_path / "out"))) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["row"].split(",")[0] for r in rows] == ["SFT", "SFT", "DPO", "DPO", "DPO"]
    full, lora = rows[0], rows[1]
    assert lora["trainable"] < full["trainable"] / 3 and lora["ckpt_bytes"] < full["ckpt_bytes"] / 3
    assert all(r["tokens_per_s"] > 0 and r["peak_mem"] > 0 for r in rows)
    assert "| run " in (tmp_path / "out" / "report.md").read_text()


def test_two_processes_equal_one_process_with_accumulation(inputs, tmp_path):
    common = ["--train.max_steps=4", "--eval.every=0", "--data.batch_size=2", "--dpo.reference=precomputed"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc, extra in ((one, 1, ["--data.grad_accum=2"]), (two, 2, [])):
        pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        res = subprocess.run([*(pre if nproc > 1 else [sys.executable]), *Z2ALL,
                              *dpo_args(inputs, out, *common, *extra)], cwd=REPO, env=cli_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6)
    wa, wb = load_weights(ckpt.latest_checkpoint(one)), load_weights(ckpt.latest_checkpoint(two))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_damaged_preference_files_are_refused_in_one_line_naming_the_file(inputs, tmp_path, capsys):
    # one byte appended to train.bin was "internal error: ValueError" (np.memmap)
    def args_for(data, out):
        return [a if not a.startswith("--data.dir=") else f"--data.dir={data}"
                for a in dpo_args(inputs, out, "--train.max_steps=1")]

    assert_damaged_data_refused(inputs["prefs"], tmp_path, [("train.bin", b"\0"), ("train.mask", b"\1"),
                                                            ("val.plen", b"\0")], args_for, run_inproc,
                                "z2all data prefs", capsys)
