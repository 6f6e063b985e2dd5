"""`z2all demo` at CI size: every stage runs on the embedded corpus (convert, tokenizer, tokenize, train,
samples, HF export loaded back by transformers with the same greedy tokens), the trained model beats the
unigram baseline, and the summary says where everything is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from z2all import demo
from z2all.train import checkpoint


def test_unigram_baseline_is_the_val_cross_entropy(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    np.array([1, 1, 1, 2], dtype=np.uint16).tofile(tok / "train-0.bin")
    np.array([1, 2], dtype=np.uint16).tofile(tok / "val-0.bin")
    (tok / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 4, "train_files": ["train-0.bin"],
                                               "val_files": ["val-0.bin"]}))
    # add-one counts: [1, 4, 2, 1] / 8 -> val tokens 1 and 2 cost -(ln 0.5 + ln 0.25) / 2
    assert demo.unigram_baseline(tok) == pytest.approx(-(np.log(4 / 8) + np.log(2 / 8)) / 2)


def test_demo_end_to_end_ci_sized(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = demo.Config(out_dir=str(out), vocab_size=1024, max_steps=24, batch_size=8, eval_every=24,
                      time_budget_s=0, threads=1)
    assert demo.run(cfg) == 0  # 0 also means transformers' greedy tokens matched ours
    text = capsys.readouterr().out
    for stage in range(1, 9):
        assert f"=== [{stage}/8]" in text
    final = checkpoint.latest_checkpoint(out / "train")
    assert final.name == "step-000024"
    assert (final / "tokenizer" / "tokenizer.json").is_file()  # generate/export find the tokenizer
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    val = checkpoint.read_state(final)["val_loss"]
    baseline = demo.unigram_baseline(out / "tokens")
    assert val < baseline, f"val loss {val:.3f} not under the unigram baseline {baseline:.3f}"
    assert "transformers greedy tokens match ours" in text
    assert str(out / "hf") in text and str(final) in text
    # stage 8: the held-out evaluation table, kept next to the run
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["ckpt"] == str(final) and report["window"] == 128
    assert set(report["domains"]) == {"wikipedia_zh", "wikipedia_en", "github_python"}
    for d in report["domains"].values():
        assert 0 < d["bpb"] < d["unigram_bpb"] + 1 and d["items"] > 0 and d["chance"] == 0.25
        assert 0 <= d["acc"] <= 1 and 0 <= d["acc_mi"] <= 1
    assert "| domain" in (out / "eval" / "report.md").read_text() and "acc_mi" in text
    assert "held-out 'which continuation?' acc_mi" in text


def test_demo_trains_with_the_settings_of_configs_demo_cpu(tmp_path):
    """The demo builds its training config in code (it must run from an installed wheel, where configs/ is
    absent); configs/demo_cpu.toml documents the same run for `z2all train`. Only the demo's run-specific
    fields (paths, resume, thread choice, time budget, prompts) may differ, so the two cannot drift."""
    from pathlib import Path

    from z2all.config import load_config, to_dict
    from z2all.train.pretrain import Config as TrainConfig

    toml = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.toml"
    ours = to_dict(demo.train_config(demo.Config(), tmp_path / "tokens", tmp_path / "train"))
    theirs = to_dict(load_config(TrainConfig, toml))
    for key in ("out_dir", "resume", "threads"):
        ours.pop(key), theirs.pop(key)
    ours["data"].pop("dir"), theirs["data"].pop("dir")
    ours["train"].pop("time_budget_s"), theirs["train"].pop("time_budget_s")
    ours["eval"].pop("prompts"), theirs["eval"].pop("prompts")
    assert ours == theirs


def test_demo_never_deletes_what_it_did_not_make(tmp_path, monkeypatch):
    """--fresh removes only the demo's stage directories; a foreign non-empty out_dir is refused."""
    from z2all.data import convert
    from z2all.io import claim_output_dir
    from z2all.utils import UserError

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not empty"):
        demo.run(demo.Config(out_dir=str(foreign), fresh=True))
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # someone's own pipeline outputs side by side look like an older (unmarked) demo dir: --fresh refuses
    own = tmp_path / "mine"
    for stage in ("converted", "tokens", "train"):
        (own / stage).mkdir(parents=True)
        (own / stage / "data.bin").write_text("a week of compute")
    with pytest.raises(UserError, match="--fresh: .* was not marked by an earlier `z2all demo`"):
        demo.run(demo.Config(out_dir=str(own), fresh=True))
    assert all((own / stage / "data.bin").is_file() for stage in ("converted", "tokens", "train"))
    assert sorted(p.name for p in own.iterdir()) == ["converted", "tokens", "train"]  # not even marked

    out = claim_output_dir(tmp_path / "demo", "demo")
    (out / "notes.txt").write_text("mine")
    (out / "converted").mkdir()
    (out / "converted" / "old.jsonl").write_text("{}")

    class Stop(Exception):
        pass

    def stop(cfg):
        raise Stop

    monkeypatch.setattr(convert, "run", stop)
    with pytest.raises(Stop):
        demo.run(demo.Config(out_dir=str(out), fresh=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "converted").exists()


def test_compare_table_counts_exact_match_and_im_end_per_task():
    records = [{"task": "arithmetic", "answer": "12"}, {"task": "arithmetic", "answer": "7"},
               {"task": "reverse", "answer": "b a"}]
    base = [("12", False), ("x", False), ("", True)]
    sft = [("12", True), ("7。", True), ("b a", True)]
    table, summary = demo.compare_table(records, base, sft)
    assert summary["arithmetic"] == {"n": 2, "base_em": 0.5, "sft_em": 1.0, "base_end": 0.0, "sft_end": 1.0}
    assert summary["all"]["sft_em"] == 1.0 and summary["all"]["base_end"] == pytest.approx(1 / 3)
    assert table.splitlines()[0].startswith("| task") and "| all " in table
    # further models (DPO, LoRA SFT) get their own exact-match columns
    table, summary = demo.compare_table(records, base, sft, {"dpo": [("12", True), ("8", True), ("b a", True)],
                                                             "lora": [("1", True), ("7", True), ("a b", False)]})
    assert summary["arithmetic"]["dpo_em"] == 0.5 and summary["reverse"]["dpo_em"] == 1.0
    assert summary["all"]["lora_em"] == pytest.approx(1 / 3) and summary["all"]["lora_end"] == pytest.approx(2 / 3)
    header = table.splitlines()[0]
    assert "DPO exact match" in header and "LoRA-SFT exact match" in header


@pytest.mark.slow  # the whole pipeline, then SFT, DPO and LoRA SFT of 10/5/10 steps: ~3 min on 2 cores
def test_demo_chat_part_ci_sized(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = demo.Config(out_dir=str(out), vocab_size=1024, max_steps=24, batch_size=8, eval_every=24,
                      time_budget_s=0, threads=1, chat=True, synth_n=300, sft_max_steps=10, sft_time_budget_s=0,
                      heldout_per_task=2, dpo_max_steps=5, dpo_time_budget_s=0)
    assert demo.run(cfg) == 0
    text = capsys.readouterr().out
    for stage in range(1, 17):
        assert f"=== [{stage}/16]" in text
    assert "SFT exact match" in text and "chat samples" in text
    assert "DPO exact match" in text and "LoRA-SFT exact match" in text and "reward accuracy" in text
    sft_ckpt = checkpoint.latest_checkpoint(out / "sft")
    assert sft_ckpt.name == "step-000010" and (sft_ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    assert checkpoint.latest_checkpoint(out / "dpo").name == "step-000005"
    assert checkpoint.latest_checkpoint(out / "sft-lora").name == "step-000010"
    res = json.loads((out / "sft" / "compare.json").read_text())
    summary = res["tasks"]
    assert res["synth_level"] == "easy"
    assert set(summary) == {"arithmetic", "reverse", "count", "numeral", "title", "all"}
    assert summary["all"]["n"] == 10
    for row in summary.values():
        for key in ("base_em", "sft_em", "dpo_em", "lora_em", "base_end", "sft_end"):
            assert 0.0 <= row[key] <= 1.0
    before, after = res["dpo"]["before"], res["dpo"]["after"]
    assert before["pairs"] == after["pairs"] > 0
    assert 0.0 <= before["logp_acc"] <= 1.0 and 0.0 <= after["reward_acc"] <= 1.0 and "reward_margin" in after
    full, lora = res["sft_cost"], res["lora"]["cost"]
    assert full["steps"] == lora["steps"] == 10
    assert 0 < lora["trainable"] < full["trainable"] / 5 and lora["ckpt_bytes"] < full["ckpt_bytes"] / 5
    assert full["peak_rss"] > 50e6 and lora["peak_rss"] > 50e6 and full["wall_s"] > 0

    # a rerun reuses every finished stage: no training, the same results
    assert demo.run(cfg) == 0
    text = capsys.readouterr().out
    assert text.count("finished (") == 3 and "starting from scratch" not in text
    assert f"{out / 'eval'} is of {checkpoint.latest_checkpoint(out / 'train')}: reused" in text
    assert json.loads((out / "sft" / "compare.json").read_text())["tasks"] == summary


def test_demo_chat_options_are_checked_before_any_stage(tmp_path):
    from z2all.utils import UserError

    for bad in ({"lora_rank": 0}, {"dpo_beta": 0.0}, {"sft_lr": float("nan")}, {"synth_n": 0}):
        with pytest.raises(UserError, match="must be a positive number"):
            demo.run(demo.Config(out_dir=str(tmp_path / "d"), chat=True, **bad))
        assert not (tmp_path / "d").exists()


def test_a_rerun_refuses_synthetic_tasks_of_other_settings(tmp_path):
    """Stage 9 reuses the synthetic tasks only when they were made with this run's --synth_level and
    --synth_n; other ones are a one-line error naming both (the SFT/DPO stages after it would mix runs); a
    missing or unreadable synth.json (an interrupted stage) means: make them."""
    from z2all.utils import UserError

    synth = tmp_path / "synth"
    cfg = demo.Config(out_dir=str(tmp_path), chat=True, synth_n=300)
    assert demo._reusable_synth(synth, cfg) is False
    synth.mkdir()
    (synth / "synth.json").write_text("{not json")
    assert demo._reusable_synth(synth, cfg) is False
    (synth / "synth.json").write_text(json.dumps({"level": "easy", "n": 300}))
    assert demo._reusable_synth(synth, cfg) is True
    for other in (demo.Config(chat=True, synth_n=300, synth_level="standard"), demo.Config(chat=True, synth_n=8000)):
        with pytest.raises(UserError, match="--synth_level .* --synth_n .*--fresh"):
            demo._reusable_synth(synth, other)


def test_eval_stage_reuses_only_a_report_of_the_same_checkpoint(tmp_path, monkeypatch, capsys):
    """Stage 8 keeps report.{md,json}; a rerun on the same checkpoint prints the kept table without scoring
    again; another checkpoint, or a report.json that is unreadable, is scored anew (never a crash)."""
    from z2all.eval import run as eval_run

    calls = []

    def fake_report(ckpt, tokens, threads=0):
        calls.append(str(ckpt))
        return f"| domain | {ckpt} |\n", {"above_chance": {"acc": False, "acc_mi": True}, "domains": {}}

    monkeypatch.setattr(eval_run, "demo_report", fake_report)
    ev = tmp_path / "eval"
    res = demo._eval_stage(tmp_path / "step-1", tmp_path / "tokens", ev, 1)
    assert calls == [str(tmp_path / "step-1")] and res["ckpt"] == str(tmp_path / "step-1")
    assert json.loads((ev / "report.json").read_text())["ckpt"] == str(tmp_path / "step-1")
    assert demo._eval_stage(tmp_path / "step-1", tmp_path / "tokens", ev, 1)["ckpt"] == str(tmp_path / "step-1")
    assert len(calls) == 1 and "reused" in capsys.readouterr().out
    demo._eval_stage(tmp_path / "step-2", tmp_path / "tokens", ev, 1)
    assert calls[-1] == str(tmp_path / "step-2") and "step-2" in (ev / "report.md").read_text()
    (ev / "report.json").write_text("{trunc")
    demo._eval_stage(tmp_path / "step-2", tmp_path / "tokens", ev, 1)
    assert len(calls) == 3 and json.loads((ev / "report.json").read_text())["ckpt"] == str(tmp_path / "step-2")


def test_eval_stage_disk_full_keeps_the_previous_report(tmp_path, monkeypatch):
    """A full disk while stage 8 writes (os.fsync fails with ENOSPC): the OSError reaches cli.main (one
    "disk full" line), the report of the earlier checkpoint is intact and no temp file is left behind."""
    import errno
    import os

    from z2all import io as zio
    from z2all.eval import run as eval_run

    monkeypatch.setattr(eval_run, "demo_report", lambda ckpt, tokens, threads=0: (
        f"table of {ckpt}\n", {"above_chance": {"acc": False, "acc_mi": True}, "domains": {}}))
    ev = tmp_path / "eval"
    demo._eval_stage(tmp_path / "step-1", tmp_path / "tokens", ev, 1)
    before = {p.name: p.read_bytes() for p in ev.iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zio.os, "fsync", full)
    with pytest.raises(OSError) as e:
        demo._eval_stage(tmp_path / "step-2", tmp_path / "tokens", ev, 1)
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in ev.iterdir()} == before
    monkeypatch.setattr(zio.os, "fsync", os.fsync)
    from z2all.cli import _os_error_line

    assert "disk full" in _os_error_line(e.value)
