"""Tasks from our own artifacts: the held-out documents of a `data tokenize` output are exactly its val
split, the unigram baseline comes from its train split when the tokenizer is the model's, and
`demo_report` (what `make demo` prints) gives bits per byte per domain next to the unigram baseline and
continuation accuracy per domain next to chance, windowed at the length the checkpoint was trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import demo_docs

from z2all.data.tokenize import is_val
from z2all.eval import run, tasks
from z2all.utils import UserError


@pytest.fixture(scope="module")
def tokens_dir(ckpt, tmp_path_factory):
    """A small tokenize-style output: one shard of unified records (zh prose + python code), meta.json
    with seed / val_fraction / shards, and a train token file."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokens")
    recs = [{"gid": i, "data_src": "wikipedia_zh", "category": "wiki", "title": "", "content": t}
            for i, t in enumerate(demo_docs(n=24, chars=800))]
    recs += [{"gid": 100 + i, "data_src": "github_python", "category": "code", "title": "x.py", "content": t}
             for i, t in enumerate(demo_docs("code_python.jsonl.gz", "content", n=24, chars=800))]
    shard = root / "conv" / "part-00000.jsonl"
    shard.parent.mkdir()
    shard.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) + "{bad line\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    train = [i for r in recs if not is_val(r["gid"], 7, 0.4) for i in tok(r["content"])["input_ids"]]
    out = root / "tokens"
    out.mkdir()
    np.asarray(train, dtype="<u2").tofile(out / "train-00000.bin")
    (out / "meta.json").write_text(json.dumps({
        "dtype": "uint16", "vocab_size": len(tok), "eos_id": tok.eos_token_id, "train_files": ["train-00000.bin"],
        "val_files": [], "tokenizer_dir": str(ckpt / "tokenizer"), "val_fraction": 0.4, "seed": 7,
        "shards": [str(shard)]}), encoding="utf-8")
    return out, recs


def test_heldout_docs_are_the_val_split_and_unigram_from_train(tokens_dir, ckpt):
    out, recs = tokens_dir
    docs = tasks.heldout_docs(out)
    want = {}
    for r in recs:
        if is_val(r["gid"], 7, 0.4):
            want.setdefault(r["data_src"], []).append(r["content"])
    assert docs == want and set(docs) == {"wikipedia_zh", "github_python"}
    assert all(len(v) >= 5 for v in docs.values())
    counts = run.unigram_counts(out, ckpt / "tokenizer")
    assert counts is not None and counts.sum() > 0
    assert run.unigram_counts(out, out) is None  # another tokenizer: no train-split baseline


def test_demo_report_table_and_results(tokens_dir, ckpt):
    out, _ = tokens_dir
    text, res = run.demo_report(ckpt, out, max_docs=8, max_tokens=2000, max_items=5)
    lines = text.splitlines()
    assert lines[0].split("|")[1].strip() == "domain" and "continuation acc" in lines[0]
    assert "unigram bits/byte (train split)" in lines[0] and res["unigram"] == "train split"
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:4]}
    assert set(rows) == set(res["domains"]) == {"github_python", "wikipedia_zh"}
    for dom, (ndocs, nbytes, bpb, unigram, acc, acc_mi, chance, n) in rows.items():
        d = res["domains"][dom]
        assert int(ndocs) == d["docs"] > 0 and int(nbytes.replace(",", "")) == d["bytes"] > 0
        assert float(bpb) == pytest.approx(d["bpb"], abs=1e-4) and float(unigram) > 0 and 0 <= float(acc) <= 1
        assert float(acc_mi) == pytest.approx(d["acc_mi"], abs=1e-4) and 0 <= d["acc_mi"] <= 1
        assert chance == "0.25" and int(n) == d["items"] and 0 < d["items"] <= 5  # the bound holds
    # the untrained fixture model guesses: the verdict line says whether every domain beat chance
    for key in ("acc", "acc_mi"):  # "above" = by more than 2 standard errors of a guesser on that many items
        want = all(d[key] > 0.25 + 2 * (0.25 * 0.75 / d["items"]) ** 0.5 for d in res["domains"].values())
        assert res["above_chance"][key] == want and (f"{key} yes" in text) == want
    # no training config next to the fixture checkpoint: windows of its max_seq_len
    assert res["window"] == 96 and run.trained_seq_len(ckpt) == 0


def test_demo_report_windows_are_the_trained_length(tokens_dir, ckpt, tmp_path):
    import shutil

    out, _ = tokens_dir
    trained = tmp_path / "ckpt"
    shutil.copytree(ckpt, trained)
    (trained / "config.json").write_text(json.dumps({"config": {"data": {"seq_len": 32}}}), encoding="utf-8")
    assert run.trained_seq_len(trained) == 32
    _, res = run.demo_report(trained, out, max_docs=4, max_tokens=500, max_items=2)
    assert res["window"] == 32


def test_in_training_scores_equal_z2all_eval_on_the_same_checkpoint(tokens_dir, ckpt, tmp_path):
    """The loop's held-out record is what `z2all eval --heldout DIR --per_doc 8 --limit N --window W` reports."""
    from contextlib import nullcontext

    from z2all.config import load_config
    from z2all.eval import intrain, score
    from z2all.train.pretrain import Config as TrainConfig

    out, _ = tokens_dir
    opts = load_config(TrainConfig, None, ["--eval.bpb_max_tokens=600", "--eval.tasks_max_items=3"]).eval
    rec = intrain.build(opts, out, ckpt / "tokenizer", 48)(score.load_lm(ckpt).model, nullcontext())
    cfg = run.Config(ckpt=[str(ckpt)], heldout=str(out), max_tokens=600, per_doc=8, limit=3, window=48,
                     out=str(tmp_path / "res"), device="cpu")
    assert run.run(cfg) == 0
    (m,) = json.loads((tmp_path / "res" / "results.json").read_text(encoding="utf-8"))["models"].values()
    assert m["window"] == 48
    assert rec["bpb"] == pytest.approx({d: r["bpb"] for d, r in m["bpb"].items()}, rel=1e-6)
    assert rec["unigram_bpb"] == pytest.approx({d: r["unigram_bpb"] for d, r in m["bpb"].items()}, rel=1e-9)
    tasks_ = {name.split("/", 1)[1]: r for name, r in m["tasks"].items()}
    assert rec["continuation_items"] == {d: r["n"] for d, r in tasks_.items()} == {d: 3 for d in tasks_}
    assert rec["continuation_acc"] == {d: r["acc"] for d, r in tasks_.items()}
    assert rec["continuation_acc_mi"] == {d: r["acc_mi"] for d, r in tasks_.items()}
    with pytest.raises(UserError, match="--window 1000 exceeds"):
        run.run(run.Config(ckpt=[str(ckpt)], heldout=str(out), window=1000, out=str(tmp_path / "r2"), device="cpu"))
