"""Fault classes of the model commands (`z2all generate`, `z2all export hf`) driven through the real CLI:
an --out that is not ours (or an earlier export someone added files to) is refused byte-identical, a damaged
checkpoint or tokenizer is named, a tokenizer that does not fit the model is refused, sampling values out
of range name their option, and --ckpt pointing at the wrong kind of path says exactly what it is. A tiny
run directory is built in-process once.

Each fault class runs one case in a subprocess (`z2all`: the real entry point, a traceback would show) and
its other variants through `cli.main` in-process (`inproc`), since every subprocess pays ~3 s of torch
import on a 2-core CI machine.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from rel_helpers import Result, assert_clean_failure, snapshot, z2all

from z2all import cli
from z2all.io import OWNER_FILE, write_checksums
from z2all.model.config import ModelConfig
from z2all.model.llama import Z2all, save_model
from z2all.tokenizer.train import Config as TokConfig
from z2all.tokenizer.train import train_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "z2all" / "data" / "demo"
GEN = ["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]


def inproc(*args) -> Result:
    """The CLI's main() in this process, stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return Result(rc, out.getvalue(), err.getvalue())


def _tiny(vocab: int) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, ffn_dim=48, max_seq_len=32)


def _checkpoint(path: Path, vocab: int, tok: Path | None, checksums: bool = True) -> Path:
    torch.manual_seed(0)
    save_model(Z2all(_tiny(vocab)), path)
    if tok is not None:
        shutil.copytree(tok, path / "tokenizer", ignore=shutil.ignore_patterns(OWNER_FILE))
    (path / "state.json").write_text(json.dumps({"step": 2}))
    if checksums:
        write_checksums(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tok/ (a 320-token z2all tokenizer), run/ (a training run layout with one checkpoint), small/ (a
    checkpoint whose vocabulary of 300 is smaller than the tokenizer)."""
    root = tmp_path_factory.mktemp("relmodel")
    with gzip.open(DEMO / "code_python.jsonl.gz", "rt", encoding="utf-8") as f:
        text = "\n".join(json.loads(line)["content"] for _, line in zip(range(20), f))
    (root / "corpus.txt").write_text(text[:40_000], encoding="utf-8")
    train_tokenizer(TokConfig(inputs=[str(root / "corpus.txt")], out_dir=str(root / "tok"), vocab_size=320,
                              workers=1))
    run = root / "run"
    ckpt = _checkpoint(run / "checkpoints" / "step-000002", 320, root / "tok")
    (run / "checkpoints" / "index.json").write_text(json.dumps({"latest": ckpt.name}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "config.json").write_text("{}")
    _checkpoint(root / "small", 300, root / "tok")
    return root, run, ckpt


def _damaged_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("where", ["run", "checkpoints", "foreign", "inside-ckpt"])
def test_export_refuses_an_out_it_does_not_own(world, where):
    """--out = the training run, the checkpoint's parent, or someone's non-empty directory: refused, and
    every file there stays byte-identical (the old export deleted any dir with a config.json)."""
    root, run, ckpt = world
    out = {"run": run, "checkpoints": ckpt.parent, "foreign": root / "mine", "inside-ckpt": ckpt / "hf"}[where]
    if where == "foreign":
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "notes.txt").write_text("keep me")
    before = snapshot(run), snapshot(out)
    res = (z2all if where == "run" else inproc)("export", "hf", "--ckpt", ckpt, "--out", out)
    assert_clean_failure(res, "--out", str(out))
    assert (snapshot(run), snapshot(out)) == before
    assert not (out / OWNER_FILE).exists()


def test_export_replaces_its_own_export_and_generate_reads_it(world):
    root, run, ckpt = world
    out = root / "exports" / "hf"
    for run_ in (z2all, inproc):  # the second run replaces the first (it is ours: owner file)
        res = run_("export", "hf", "--ckpt", run, "--out", out)
        assert res.rc == 0, res.text
    assert "using its latest checkpoint" in res.err
    assert json.loads((out / OWNER_FILE).read_text())["command"] == "export hf"
    assert (out / "checksums.json").is_file()
    saved = json.loads((out / "z2all_export.json").read_text())  # the resolved config, as every command saves
    assert saved["config"]["ckpt"] == str(run) and saved["checkpoint"] == str(ckpt)
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temp or old dirs left
    a = inproc(*GEN, "--ckpt", ckpt)
    b = inproc(*GEN, "--ckpt", out)  # our export is a valid --ckpt, same weights, same text
    assert a.rc == 0 and b.rc == 0, a.text + b.text
    assert a.out == b.out


def test_export_keeps_files_a_user_added_to_its_earlier_export(world, tmp_path):
    """An earlier export that someone added to (notes, `z2all eval`'s eval/ written beside the weights) is not
    replaced: refused in one line naming a foreign file, every file byte-identical; moved out, it is."""
    root, run, ckpt = world
    out = tmp_path / "hf"
    assert inproc("export", "hf", "--ckpt", ckpt, "--out", out).rc == 0
    (out / "README_mine.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    before = snapshot(out)
    res = z2all("export", "hf", "--ckpt", ckpt, "--out", out)
    assert_clean_failure(res, "--out", "README_mine.md", "did not write")
    assert snapshot(out) == before
    (out / "README_mine.md").unlink()
    shutil.rmtree(out / "eval")
    assert inproc("export", "hf", "--ckpt", ckpt, "--out", out).rc == 0
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_weights_are_named(world, checksums, tmp_path):
    """A truncated model.safetensors: generate and export name the file, with or without checksums.json."""
    root, _, ckpt = world
    bad = _damaged_copy(ckpt, tmp_path / "bad")
    if not checksums:
        (bad / "checksums.json").unlink()
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(bad)
    assert_clean_failure((z2all if checksums else inproc)(*GEN, "--ckpt", bad), "model.safetensors", "truncated")
    assert_clean_failure(inproc("export", "hf", "--ckpt", bad, "--out", tmp_path / "hf"), "model.safetensors")
    assert not (tmp_path / "hf").exists()  # a failed export leaves nothing behind
    assert snapshot(bad) == before


@pytest.mark.parametrize("damage", ["tokenizer.json", "tokenizer_config.json", "prompt-file"])
def test_corrupt_tokenizer_or_prompt_file_is_named(world, damage, tmp_path):
    root, _, ckpt = world
    bad = _damaged_copy(ckpt, tmp_path / "ck")
    args = [*GEN, "--ckpt", bad]
    if damage == "prompt-file":
        (tmp_path / "p.txt").write_bytes(b"fine line\n\xff\xfe not utf-8\n")
        args = ["generate", "--ckpt", bad, "--prompt-file", tmp_path / "p.txt", "--device", "cpu"]
        patterns = ["--prompt-file", "line 2", "UTF-8"]
    else:
        f = bad / "tokenizer" / damage
        f.write_bytes(f.read_bytes()[:100])
        patterns = [str(f)]
    assert_clean_failure((z2all if damage == "tokenizer.json" else inproc)(*args), *patterns)


def test_tokenizer_bigger_than_the_vocabulary_is_refused(world):
    root, _, _ = world
    line = assert_clean_failure(z2all(*GEN, "--ckpt", root / "small"), "320", "300")
    assert "tokenizer" in line
    assert_clean_failure(inproc("export", "hf", "--ckpt", root / "small", "--out", root / "x"), "320", "300")
    assert not (root / "x").exists()


@pytest.mark.parametrize("option, value, words", [
    ("--top-p", "0", ["--top-p", "(0, 1]"]),
    ("--top-p", "1.5", ["--top-p"]),
    ("--repetition-penalty", "0", ["--repetition-penalty", "> 0"]),
    ("--temperature", "-1", ["--temperature", ">= 0"]),
    ("--top-k", "-2", ["--top-k"]),
    ("--max-new-tokens", "0", ["--max-new-tokens", ">= 1"]),
    ("--max-new-tokens", "100000000000", ["--max-new-tokens", "KV cache", "free"]),
])
def test_bad_sampling_values_name_the_option(world, option, value, words):
    _, _, ckpt = world
    run_ = z2all if (option, value) == ("--top-p", "0") else inproc
    assert_clean_failure(run_(*GEN, "--ckpt", ckpt, option, value), *words)


@pytest.mark.parametrize("case", ["missing", "empty-run", "not-a-ckpt", "file", "no-model-config"])
def test_wrong_ckpt_path_says_what_it_is(world, case, tmp_path):
    """--ckpt on a missing path, a run without checkpoints, some other dir, a file, or a training checkpoint
    that lost its model_config.json (its config.json is the run's, not a Hugging Face one): the message
    names --ckpt and what was found, never 'tokenizer directory not found' or 'model_type None'."""
    _, _, ckpt = world
    path, words = {
        "no-model-config": (tmp_path / "c", ["--ckpt", "model_config.json", "incomplete"]),
        "missing": (tmp_path / "nope", ["--ckpt", "no such directory"]),
        "empty-run": (tmp_path / "run", ["--ckpt", "without", "checkpoint"]),
        "not-a-ckpt": (tmp_path / "other", ["--ckpt", "not a checkpoint", "notes.txt"]),
        "file": (ckpt / "model.safetensors", ["--ckpt", "is a file", str(ckpt)]),
    }[case]
    if case == "empty-run":
        (path / "checkpoints").mkdir(parents=True)
        (path / "metrics.jsonl").write_text("")
    if case == "not-a-ckpt":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    if case == "no-model-config":
        shutil.copytree(ckpt, path)
        (path / "model_config.json").unlink()
        (path / "config.json").write_text('{"config": {"seed": 1}}')
        (path / "state.json").write_text('{"step": 3}')
        line = assert_clean_failure(inproc("export", "hf", "--ckpt", path, "--out", tmp_path / "hf"), *words)
        assert "model_type" not in line and not (tmp_path / "hf").exists()
    line = assert_clean_failure((z2all if case == "missing" else inproc)(*GEN, "--ckpt", path), *words)
    assert "tokenizer" not in line
