"""`z2all sft` end to end on a tiny model: it trains from a pretrained checkpoint, evaluates and answers held-out
prompts, and its checkpoints carry the tokenizer; a run killed with SIGKILL resumes with identical losses; 2 gloo
processes equal 1 process with 2 accumulation steps; after `z2all export hf`, transformers' apply_chat_template
gives our renderer's ids and model.generate stops at <|im_end|>; wrong inputs are refused with one line; a LoRA
resume onto another --init base is refused."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from sft_helpers import make_sft_inputs, run_sft_cli, run_sft_inproc, sft_args
from train_helpers import assert_damaged_data_refused, load_weights, train_losses

from z2all.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_sft_inputs(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_run") / "run"
    assert run_sft_inproc(sft_args(inputs, out, "--train.max_steps=40", "--eval.every=20", "--train.log_every=5")) == 0
    return out


def test_sft_trains_evaluates_and_carries_the_tokenizer(inputs, trained):
    recs = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    samples = [r for r in recs if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [20, 40]
    assert all(0 <= r["exact_match"] <= 1 and len(r["samples"]) == 2 for r in samples)
    assert samples[0]["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
    last = ckpt.latest_checkpoint(trained)
    tok = last / "tokenizer"
    assert json.loads((tok / "tokenizer_config.json").read_text())["chat_template"]
    assert (tok / "tokenizer.json").read_bytes() == (inputs["tok"] / "tokenizer.json").read_bytes()
    assert json.loads((trained / ".z2all-owner.json").read_text())["command"] == "sft"


def test_plot_draws_an_sft_run(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from z2all.train import plot

    assert plot.run(plot.Config(run=str(trained), out_dir=str(tmp_path / "png"))) == 0
    assert plot.written_by_us(tmp_path / "png" / "loss.png") and (tmp_path / "png" / "throughput.png").is_file()


def test_val_loss_is_the_per_token_loss_whatever_the_packing(inputs, tmp_path):
    """The val loss is the mean over every labelled val token: padded rows (10 batches) and packed rows (fewer)
    give the same number on the same weights (lr 0: the base model), which a direct per-example computation
    gives too. It was a mean of batch means, so it moved with batching (8.8533 padded vs 8.7035 packed)."""
    import numpy as np

    from z2all.data.sft_loader import IGNORE, load_examples
    from z2all.model.llama import load_model

    vals = {}
    for packing in ("pack", "pad"):
        out = tmp_path / packing
        assert run_sft_inproc(sft_args(inputs, out, "--train.max_steps=1", "--optim.lr=0", "--optim.min_lr=0",
                                       "--eval.samples=0", "--eval.max_batches=1000", f"--data.packing={packing}")) == 0
        [rec] = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
        vals[packing] = rec["val_loss"]
        assert rec["val_ppl"] == pytest.approx(np.exp(rec["val_loss"]))  # a per-token loss: ppl is meaningful

    torch.manual_seed(0)
    model = load_model(inputs["base"]).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in load_examples(inputs["chat"], "val", 128)[0]:
            x = torch.from_numpy(ids)[None]
            y = torch.from_numpy(np.append(np.where(mask[1:], ids[1:], IGNORE), IGNORE))[None]
            n = int((y != IGNORE).sum())
            total += float(model(x, y)[1]) * n
            count += n
    direct = total / count
    assert vals["pack"] == pytest.approx(direct, rel=1e-5)
    assert vals["pad"] == pytest.approx(direct, rel=1e-5)


def test_sigkill_then_resume_matches_uninterrupted(inputs, tmp_path, capsys):
    steps = 120
    common = ["--train.max_steps=" + str(steps), "--train.log_every=1", "--ckpt.every=10", "--ckpt.keep_last=1",
              "--eval.every=60", "--eval.samples=0"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_sft_inproc(sft_args(inputs, ref, *common)) == 0

    proc = run_sft_cli(sft_args(inputs, killed, *common), popen=True)
    target = killed / "checkpoints" / "step-000020"
    deadline = time.time() + 180
    while time.time() < deadline and not target.is_dir() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; lengthen it"
    at = ckpt.read_state(ckpt.latest_checkpoint(killed))["next_step"]
    assert 20 <= at < steps

    assert run_sft_inproc([*sft_args(inputs, killed, *common), "--resume=true"]) == 0
    assert f"resumed from {killed / 'checkpoints'}" in capsys.readouterr().out
    want, got = train_losses(ref), train_losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]  # bit for bit
    a, b = load_weights(ckpt.latest_checkpoint(ref)), load_weights(ckpt.latest_checkpoint(killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", ["pack", pytest.param("pad", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_with_accumulation(inputs, tmp_path, packing):
    # the whole val split (max_batches is per process): each process scores its share of the rows
    common = ["--train.max_steps=6", "--train.log_every=1", "--eval.every=0", "--eval.samples=0",
              f"--data.packing={packing}", "--data.batch_size=2", "--eval.max_batches=1000"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_sft_cli(sft_args(inputs, one, *common, "--data.grad_accum=2"))
    run_sft_cli(sft_args(inputs, two, *common), nproc=2)  # CPU: gloo
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6)
    wa, wb = load_weights(ckpt.latest_checkpoint(one)), load_weights(ckpt.latest_checkpoint(two))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    # the val loss over the same val set: summed over the processes, not a mean of per-process means
    va, vb = ([r["val_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "val"] for d in (one, two))
    assert len(va) == len(vb) == 1 and va[0] == pytest.approx(vb[0], rel=1e-5)


def test_export_hf_chat_template_and_generate_stop_at_im_end(inputs, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from z2all.data.chat import ChatData, Renderer
    from z2all.model.hf_compat import export_hf

    out = export_hf(ckpt.latest_checkpoint(trained), tmp_path / "hf")
    # the two ways to chat with our tokenizer in transformers (tokenizer/hf.py): its own class (remote code), or
    # the plain fast tokenizer loaded with split_special_tokens=False and sanitize_control_tokens=True
    remote = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), split_special_tokens=False, local_files_only=True)

    def ids_of(x):
        return list(x if isinstance(x, list) else x["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id

    renderer = Renderer(inputs["tok"])
    val = ChatData(inputs["chat"], "val")
    records = [json.loads(x) for x in (inputs["synth"] / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for rec in records[:5]:
        msgs = rec["messages"]
        ids, _ = renderer.render([msgs])[0]
        assert ids_of(remote.apply_chat_template(msgs)) == ids
        assert ids_of(tok.apply_chat_template(msgs, tokenize=True, sanitize_control_tokens=True)) == ids
        hf_prompt = ids_of(remote.apply_chat_template(msgs[:-1], add_generation_prompt=True))
        assert ids_of(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True,
                                              sanitize_control_tokens=True)) == hf_prompt
        # the generation prompt is the rendering of the conversation up to where the answer starts
        assert ids[:len(hf_prompt)] == hf_prompt
    # the prompts the SFT eval uses (val conversations up to their first trained token) are the same ids
    ids, mask = val.example(0)
    first = int(mask.argmax())
    assert ids[:first].tolist()[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False,
                                            split_special_tokens=False)["input_ids"][-3:]

    # greedy generation: transformers and ours agree and the answer ends at <|im_end|>
    from z2all.model.hf_compat import load_checkpoint
    from z2all.train.sft import answer

    ours = load_checkpoint(ckpt.latest_checkpoint(trained))[0].eval()
    prompt = ids[:first].tolist()
    [(new, ended)] = answer(ours, [prompt], im_end, max_new_tokens=24)
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert ended, "the fine-tuned fixture model closes its turns with <|im_end|>"
    assert gen == new + [im_end]  # transformers stops right at <|im_end|> (generation_config's eos list)


def test_refusals(inputs, tmp_path, capsys):
    from z2all.data import synthetic

    res = run_sft_cli(sft_args(inputs, tmp_path / "r1", f"--tokenizer={inputs['synth']}"), check=False)
    assert res.returncode == 2 and "tokenizer.json" in res.stderr and "Traceback" not in res.stderr
    other = tmp_path / "other"
    synthetic.run(synthetic.Config(out=str(other), n=10))
    res = run_sft_cli(sft_args(inputs, other), check=False)
    assert res.returncode == 2 and "data synth" in res.stderr and "Traceback" not in res.stderr
    res = run_sft_cli([a for a in sft_args(inputs, tmp_path / "r2") if not a.startswith("--init")], check=False)
    assert res.returncode == 2 and "--init" in res.stderr


def test_damaged_chat_files_are_refused_in_one_line_naming_the_file(inputs, tmp_path, capsys):
    # one byte appended to the tokens was "internal error: ValueError" (np.memmap); to the mask, a silent run
    def args_for(data, out):
        return [a if not a.startswith("--data.dir=") else f"--data.dir={data}"
                for a in sft_args(inputs, out, "--train.max_steps=1")]

    assert_damaged_data_refused(inputs["chat"], tmp_path, [("train-00000.bin", b"\0"), ("train-00000.mask", b"\1"),
                                                           ("val-00000.mask", b"\1")], args_for, run_sft_inproc,
                                "z2all data chat", capsys)


def test_lora_resume_refuses_another_base(inputs, tmp_path, capsys):
    """LoRA adapters only mean something on the base they were trained on: a resume with another --init is
    refused naming the run's; the same weights copied elsewhere are the same base."""
    import shutil

    from z2all.model.llama import load_model, save_model

    out = tmp_path / "run"
    common = ["--lora.rank=2", "--ckpt.every=2", "--eval.every=0", "--eval.samples=0"]
    assert run_sft_inproc(sft_args(inputs, out, *common, "--train.max_steps=2")) == 0
    other, moved = tmp_path / "other", tmp_path / "moved"
    model = load_model(inputs["base"])
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(1.5)
    save_model(model, other)
    shutil.copytree(inputs["base"] / "tokenizer", other / "tokenizer")
    shutil.copytree(inputs["base"], moved)
    capsys.readouterr()

    def resume(init):
        return run_sft_inproc([a if not a.startswith("--init=") else f"--init={init}"
                               for a in sft_args(inputs, out, *common, "--train.max_steps=4", "--resume=true")])

    assert resume(other) == 2
    err = capsys.readouterr().err
    assert f"--init {inputs['base']}" in err and f"now --init {other}" in err and "Traceback" not in err, err
    assert resume(moved) == 0
    assert "at step 2" in capsys.readouterr().out


def test_plot_draws_a_single_point_and_names_a_dpo_loss(trained, tmp_path, monkeypatch):
    """A run with one train record: its point is drawn with a marker (a lone point of a plain line was
    invisible); a `z2all dpo` run's loss axis says it is a DPO loss, not a cross-entropy."""
    pytest.importorskip("matplotlib")
    import json

    from z2all.io import OWNER_FILE
    from z2all.train import plot

    figs = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: figs.__setitem__(path.name, fig))
    one = tmp_path / "one"
    one.mkdir()
    first = next(line for line in (trained / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line)
    (one / "metrics.jsonl").write_text(first + "\n")
    assert plot.run(plot.Config(run=str(one))) == 0
    (line,) = figs["loss.png"].axes[0].get_lines()
    assert len(line.get_xdata()) == 1 and line.get_marker() == "o"
    assert figs["loss.png"].axes[0].get_ylabel() == "cross-entropy (nats/token)"
    (one / OWNER_FILE).write_text(json.dumps({"command": "dpo"}))
    assert plot.run(plot.Config(run=str(one))) == 0
    assert figs["loss.png"].axes[0].get_ylabel() == "DPO loss (preference pairs)"
