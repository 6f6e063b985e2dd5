"""The training loop on CPU, in process: it trains any Objective (not only pretraining); a small batch
overfits; NaN losses are skipped and counted and a streak of them stops the run with the last good checkpoint
intact; Ctrl-C saves before exiting; `z2all plot` draws the curves; the checkpoint holds what generate/export
need; the opt-in held-out scores (bits per byte and "which continuation?" accuracy per domain) are logged at
each evaluation, bounded, refused early when misconfigured, identical after a resume, drawn by `z2all plot`,
and change no training loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import REPO, TINY, cli_env, run_cli, train_losses, write_token_dir

from z2all.config import load_config
from z2all.model.llama import Z2all, load_model
from z2all.train import checkpoint as ckpt
from z2all.train import plot
from z2all.train.pretrain import Config, TrainingDiverged, run


def make_cfg(tmp_path, tokens, *extra):
    return load_config(Config, None, [*TINY, f"--data.dir={tokens}", f"--out_dir={tmp_path / 'run'}", *extra])


def test_small_batch_overfits_and_plots(tmp_path):
    # 4 windows of 16 tokens, batch 4: every step sees the whole training set, which the model memorises
    tokens = write_token_dir(tmp_path / "tok", n_train=4 * 16 + 1, n_val=200)
    cfg = make_cfg(tmp_path, tokens, "--train.max_steps=150", "--train.log_every=10", "--optim.lr=1e-2",
                   "--optim.warmup_steps=10", "--optim.weight_decay=0", "--eval.every=0", "--ckpt.every=0")
    assert run(cfg) == 0
    losses = train_losses(cfg_dir := tmp_path / "run")
    first, last = losses[1], losses[150]
    assert first > 4.0  # ~ln(96) at init
    assert last < 0.3, f"did not overfit: {first:.3f} -> {last:.3f}"
    # the final checkpoint: loadable weights, optimizer, state, and the metrics plot
    final = ckpt.latest_checkpoint(cfg_dir)
    assert final.name == "step-000150" and ckpt.read_state(final)["next_step"] == 150
    model = load_model(final)
    assert isinstance(model, Z2all) and model.cfg.dim == 32
    assert plot.run(plot.Config(run=str(cfg_dir))) == 0
    assert (cfg_dir / "loss.png").stat().st_size > 1000 and (cfg_dir / "throughput.png").is_file()


def _nan_after(monkeypatch, bad_calls):
    """Make the model's training forward return a NaN loss on the given (0-based) call numbers."""
    orig = Z2all.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = orig(self, idx, targets, **kw)
        if targets is not None and self.training:
            if bad_calls(calls["n"]):
                loss = loss * float("nan")
            calls["n"] += 1
        return logits, loss

    monkeypatch.setattr(Z2all, "forward", forward)


def test_a_nan_step_is_skipped_and_counted(tmp_path, monkeypatch, capsys):
    tokens = write_token_dir(tmp_path / "tok")
    _nan_after(monkeypatch, lambda n: n == 3)  # step 4
    cfg = make_cfg(tmp_path, tokens, "--train.max_steps=8", "--train.log_every=1", "--eval.every=0")
    assert run(cfg) == 0
    # the line names what was not finite (it printed the finite one too, as if both were)
    assert "step 4: non-finite loss nan and grad norm nan: update skipped" in capsys.readouterr().out
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    skips = [r for r in recs if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [4]
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert 4 not in train and train[8]["skipped"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train.values())


def test_nan_streak_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    tokens = write_token_dir(tmp_path / "tok")
    _nan_after(monkeypatch, lambda n: n >= 6)  # steps 7, 8, 9 ...
    cfg = make_cfg(tmp_path, tokens, "--train.max_steps=30", "--ckpt.every=3", "--eval.every=0",
                   "--train.max_bad_steps=3")
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(steps 7..9\).*step-000006"):
        run(cfg)
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000003", "step-000006"]
    good = load_model(ckpt.latest_checkpoint(run_dir))
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_ctrl_c_saves_a_checkpoint_then_resume_continues(tmp_path):
    tokens = write_token_dir(tmp_path / "tok")
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "z2all", "train", *TINY, f"--data.dir={tokens}", f"--out_dir={run_dir}",
            "--train.max_steps=100000", "--train.log_every=1", "--eval.every=0", "--ckpt.every=0"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Ctrl-C" in out
    last = ckpt.latest_checkpoint(run_dir)
    assert last is not None, out
    step = ckpt.read_state(last)["next_step"]
    assert step >= 3 and max(train_losses(run_dir)) == step
    cfg = load_config(Config, None, [*TINY, f"--data.dir={tokens}", f"--out_dir={run_dir}", "--resume=true",
                                     f"--train.max_steps={step + 2}", "--eval.every=0", "--train.log_every=1"])
    assert run(cfg) == 0
    assert max(train_losses(run_dir)) == step + 2


def test_activation_checkpointing_keeps_losses_and_parameter_names(tmp_path):
    tokens = write_token_dir(tmp_path / "tok")
    args = ["--train.max_steps=4", "--train.log_every=1", "--eval.every=0"]
    assert run(make_cfg(tmp_path / "a", tokens, *args)) == 0
    assert run(make_cfg(tmp_path / "b", tokens, *args, "--train.activation_checkpointing=true")) == 0
    a, b = train_losses(tmp_path / "a/run"), train_losses(tmp_path / "b/run")
    assert b == pytest.approx(a, rel=1e-6)
    # recomputation is applied from outside without renaming parameters: the checkpoint loads as usual
    assert isinstance(load_model(ckpt.latest_checkpoint(tmp_path / "b/run")), Z2all)


@pytest.mark.slow  # inductor compiles the blocks with the C++ compiler: ~2 min on 2 cores
def test_torch_compile_trains_like_eager(tmp_path):
    tokens = write_token_dir(tmp_path / "tok")
    args = ["--train.max_steps=4", "--train.log_every=1", "--eval.every=0"]
    assert run(make_cfg(tmp_path / "eager", tokens, *args)) == 0
    assert run(make_cfg(tmp_path / "compiled", tokens, *args, "--train.compile=true")) == 0
    want, got = train_losses(tmp_path / "eager/run"), train_losses(tmp_path / "compiled/run")
    assert got == pytest.approx(want, rel=1e-4)  # fused kernels reorder fp32 sums; nothing else changes


def test_the_loop_trains_any_objective_and_resumes_it(tmp_path):
    """train/loop.py knows nothing of token files: a toy objective (predict a fixed random sequence, batches
    from its own seeded generator) trains, checkpoints and resumes through the same loop."""
    from z2all.model.config import model_preset
    from z2all.train import distributed as dist_mod
    from z2all.train.loop import Objective, train_loop

    class Copy(Objective):
        grad_accum, tokens_per_step = 2, 2 * 4 * 16

        def __init__(self):
            self.model_config = model_preset("tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=24)
            self.seq = torch.randint(0, 24, (17,), generator=torch.Generator().manual_seed(0))

        def build_model(self):
            return Z2all(self.model_config)

        def micro_batch(self, step, micro):
            return self.seq.repeat(4, 1)  # every window the same: the loss must fall fast

        def loss(self, model, batch, device):
            return model(batch[:, :-1].to(device), batch[:, 1:].to(device))[1]

        def resume_state(self):
            return {"task": "copy"}

        def check_resume(self, ckpt, state):
            assert state["task"] == "copy"

    def cfg(steps, resume=False):
        return load_config(Config, None, [f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--threads=1",
                                          f"--train.max_steps={steps}", "--train.log_every=1", "--eval.every=0",
                                          "--ckpt.every=0", "--optim.warmup_steps=2", "--optim.lr=1e-2",
                                          "--optim.decay_steps=40", "--metrics.tensorboard=false",
                                          f"--resume={str(resume).lower()}"])

    info = dist_mod.init_distributed("cpu")
    assert train_loop(cfg(20), info, Copy()) == 0
    assert train_loop(cfg(40, resume=True), info, Copy()) == 0
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 41)) and losses[40] < 0.5 * losses[1]
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["next_step"] == 40 and state["task"] == "copy" and state["grad_accum"] == 2


# ---------------------------------------------------------------- held-out scores during training

@pytest.fixture(scope="module")
def heldout_tokens(tmp_path_factory):
    from heldout_helpers import write_heldout_token_dir

    return write_heldout_token_dir(tmp_path_factory.mktemp("heldout"))


HELDOUT = ["--eval.bpb_max_tokens=1500", "--eval.tasks_max_items=6"]


def _heldout_records(run_dir, timed: bool = True) -> dict[int, dict]:
    """step -> the "heldout" record (without its wall time when timed=False)."""
    return {r["step"]: {k: v for k, v in r.items() if timed or k != "heldout_s"}
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "heldout"}


def test_heldout_scores_are_logged_resumed_and_plotted_without_changing_training(tmp_path, heldout_tokens, capsys):
    import shutil
    from contextlib import nullcontext

    from z2all.eval import intrain

    common = ["--data.seq_len=64", "--train.max_steps=20", "--train.log_every=1", "--eval.every=10",
              "--ckpt.every=10", "--ckpt.keep_last=2", "--model.dropout=0.1"]  # dropout: an RNG draw would show
    with_scores = make_cfg(tmp_path / "a", heldout_tokens, *common, *HELDOUT)
    plain = make_cfg(tmp_path / "b", heldout_tokens, *common)
    assert run(with_scores) == 0 and run(plain) == 0
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    # scoring the held-out documents draws no random number and reads no batch: the same losses bit for bit
    assert train_losses(a) == train_losses(b) and len(train_losses(a)) == 20

    recs = _heldout_records(a)
    assert sorted(recs) == [10, 20] and not _heldout_records(b)
    doms = {"wikipedia_zh", "github_python"}
    for r in recs.values():
        assert set(r["bpb"]) == set(r["unigram_bpb"]) == set(r["continuation_acc"]) == doms
        assert set(r["continuation_acc_norm"]) == set(r["continuation_acc_mi"]) == doms
        assert all(0 < v < 12 for v in r["bpb"].values()) and all(0 < v < 12 for v in r["unigram_bpb"].values())
        assert all(0 <= v <= 1 for v in [*r["continuation_acc"].values(), *r["continuation_acc_mi"].values()])
        assert r["chance"] == 0.25
        assert r["continuation_items"] == {d: 6 for d in doms}  # the bound holds
        assert all(1500 <= n < 3000 for n in r["bpb_tokens"].values())  # whole documents up to the bound
    assert recs[10]["unigram_bpb"] == recs[20]["unigram_bpb"]  # a reference: the train split's unigram
    assert all(recs[20]["bpb"][d] < recs[10]["bpb"][d] for d in doms)  # training lowers it

    # the logged numbers are those of `intrain` on the saved checkpoint, windows of data.seq_len tokens
    held = intrain.build(with_scores.eval, heldout_tokens, ckpt.latest_checkpoint(a) / "tokenizer", 64)
    again = held(load_model(ckpt.latest_checkpoint(a)), nullcontext())
    assert again["bpb"] == pytest.approx(recs[20]["bpb"], rel=1e-6)
    assert again["continuation_acc"] == recs[20]["continuation_acc"]
    assert again["continuation_acc_mi"] == recs[20]["continuation_acc_mi"]

    # a run killed after its step-10 checkpoint resumes to the same losses and the same held-out records
    c = tmp_path / "c" / "run"
    shutil.copytree(a, c)
    shutil.rmtree(c / "checkpoints" / "step-000020")
    resumed = make_cfg(tmp_path / "c", heldout_tokens, *common, *HELDOUT, "--resume=true")
    assert run(resumed) == 0
    assert train_losses(c) == train_losses(a)
    assert "resumed from" in capsys.readouterr().out
    assert _heldout_records(c, timed=False) == _heldout_records(a, timed=False)  # step 20's scored again

    # z2all plot draws them (a panel per family, a line per domain); a run without them gets no heldout.png
    assert plot.run(plot.Config(run=str(a))) == 0 and (a / "heldout.png").stat().st_size > 1000
    assert plot.written_by_us(a / "heldout.png")
    assert plot.run(plot.Config(run=str(b))) == 0 and not (b / "heldout.png").exists()


def test_heldout_options_are_refused_before_anything_is_written(tmp_path, heldout_tokens):
    from z2all.utils import UserError

    synthetic = write_token_dir(tmp_path / "tok")  # no tokenizer, no shards
    cases = [
        (heldout_tokens, ["--eval.tasks_max_items=-1"], "--eval.tasks_max_items=-1: must be >= 0"),
        (heldout_tokens, ["--eval.bpb_max_tokens=100", f"--eval.heldout={tmp_path / 'nowhere'}"],
         "--eval.heldout .*: no meta.json"),
        (heldout_tokens, ["--eval.bpb_max_tokens=100", "--eval.texts=law.txt"], "must look like NAME=PATH"),
        (heldout_tokens, ["--eval.bpb_max_tokens=100", f"--eval.texts=law={tmp_path / 'law.txt'}"], "not found"),
        (synthetic, ["--eval.bpb_max_tokens=100"], "need the tokenizer"),
    ]
    for i, (tokens, extra, msg) in enumerate(cases):
        cfg = make_cfg(tmp_path / str(i), tokens, "--data.seq_len=64", *extra)
        with pytest.raises(UserError, match=msg):
            run(cfg)
        assert not (tmp_path / str(i) / "run").exists()


def test_metrics_writer_sends_per_domain_families_to_tensorboard(tmp_path):
    from z2all.train.metrics import MetricsWriter

    class FakeTB:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    w = MetricsWriter(tmp_path, tensorboard=False)
    w._tb = tb = FakeTB()
    w.log({"kind": "heldout", "step": 7, "bpb": {"zh": 1.5, "code": 0.9}, "chance": 0.25, "ok": True,
           "note": "x", "continuation_acc": {"zh": 0.5}})
    w.close()
    assert tb.scalars == [("bpb/zh", 1.5, 7), ("bpb/code", 0.9, 7), ("heldout/chance", 0.25, 7),
                          ("continuation_acc/zh", 0.5, 7)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["bpb"] == {"zh": 1.5, "code": 0.9}


def test_sft_logs_heldout_scores_on_named_texts(tmp_path):
    from heldout_helpers import demo_docs
    from sft_helpers import make_sft_inputs, run_sft_inproc, sft_args

    inputs = make_sft_inputs(tmp_path / "in", n=200)
    texts = tmp_path / "zh.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                             for t in demo_docs("zh_wiki.jsonl.gz", "text", 8, 700)), encoding="utf-8")
    out = tmp_path / "sft"
    assert run_sft_inproc(sft_args(inputs, out, "--train.max_steps=4", "--eval.every=0", "--eval.samples=0",
                                   "--eval.bpb_max_tokens=300", "--eval.tasks_max_items=4",
                                   f"--eval.texts=zh={texts}")) == 0
    (rec,) = _heldout_records(out).values()
    assert rec["step"] == 4 and set(rec["bpb"]) == {"zh"} and rec["bpb"]["zh"] > 0
    assert 300 <= rec["bpb_tokens"]["zh"] and rec["continuation_items"] == {"zh": 4}
    assert "unigram_bpb" in rec  # in-sample: no train split to count


def test_ddp_scores_on_rank_0_once_and_agrees_on_errors(tmp_path, heldout_tokens):
    args = ["train", *TINY, f"--data.dir={heldout_tokens}", "--data.seq_len=64", "--train.max_steps=4",
            "--eval.every=2", "--ckpt.every=0", *HELDOUT]
    res = run_cli([*args, f"--out_dir={tmp_path / 'ddp'}"], nproc=2, timeout=300)
    assert sorted(_heldout_records(tmp_path / "ddp")) == [2, 4]  # one record per evaluation, from rank 0
    assert res.stdout.count("held-out: bpb") == 2
    # rank 0 fails to read the documents: both ranks stop with its one-line error (exit 2 each), no hang
    bad = run_cli([*args, f"--out_dir={tmp_path / 'bad'}", f"--eval.heldout={tmp_path / 'nowhere'}"], nproc=2,
                  timeout=300, check=False)
    assert bad.returncode != 0 and bad.stderr.count(f"error: --eval.heldout {tmp_path / 'nowhere'}: no meta.json") == 2
    assert not (tmp_path / "bad").exists()
