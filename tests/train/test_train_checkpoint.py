"""Checkpoint bookkeeping: an interrupted save (temp dir, or a dir without state.json) is never taken for a
checkpoint; retention keeps the last K plus the best by validation loss, and never deletes a checkpoint that
holds files training did not write (it is kept, named once); index.json names latest and best; optimizer
state round-trips by parameter name."""

from __future__ import annotations

import errno
import json

import torch

from z2all.model.config import model_preset
from z2all.model.llama import Z2all
from z2all.train import checkpoint as ckpt
from z2all.train.optim import OptimConfig, make_optimizer


def _fake(run, step, val):
    d = ckpt.ckpt_root(run) / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "val_loss": val}))


def test_retention_keeps_last_k_and_best(tmp_path):
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, None), (50, 2.6)]:
        _fake(tmp_path, step, val)
    (ckpt.ckpt_root(tmp_path) / ".tmp-step-000060-123").mkdir()  # a save killed mid-way
    (ckpt.ckpt_root(tmp_path) / "step-000070").mkdir()  # no state.json: incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000050"
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000020", "step-000040", "step-000050"]
    index = json.loads((ckpt.ckpt_root(tmp_path) / "index.json").read_text())
    assert index["latest"] == "step-000050" and index["best"] == "step-000020" and index["best_val_loss"] == 2.0


def _saved(run, step):
    """A checkpoint as save_checkpoint writes it (atomic_dir: checksums.json + the manifest), with tokenizer/."""
    from z2all.io import atomic_dir, write_checksums

    with atomic_dir(ckpt.ckpt_root(run) / f"step-{step:06d}") as tmp:
        (tmp / "state.json").write_text(json.dumps({"step": step, "val_loss": None}))
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "tokenizer.json").write_text("{}")
        (tmp / "tokenizer" / ".z2all-owner.json").write_text("{}")  # copied with the tokenizer dir
        write_checksums(tmp)


def test_retention_keeps_a_checkpoint_holding_files_training_did_not_write(tmp_path, capsys):
    from z2all.io import MANIFEST_FILE, verify_checksums

    for step in (10, 20, 30, 40):
        _saved(tmp_path, step)
    _fake(tmp_path, 50, None)  # an older z2all's checkpoint: neither manifest nor checksums
    root = ckpt.ckpt_root(tmp_path)
    # `z2all eval --ckpt RUN` writes into step-N/eval/; a user's notes; a user's dot file
    (root / "step-000010" / "eval").mkdir()
    (root / "step-000010" / "eval" / "results.json").write_text("{}")
    (root / "step-000020" / "notes.txt").write_text("lr spike here")
    (root / "step-000050" / ".my-notes").write_text("mine")
    # checksums.json only (no manifest): its list is the record, the tokenizer copy's dot files included
    (root / "step-000030" / MANIFEST_FILE).unlink()
    assert ckpt.foreign_files(root / "step-000010") == ["eval/results.json"]
    assert ckpt.foreign_files(root / "step-000020") == ["notes.txt"]
    assert ckpt.foreign_files(root / "step-000030") == []
    assert ckpt.foreign_files(root / "step-000040") == []
    assert ckpt.foreign_files(root / "step-000050") == [".my-notes"]
    (root / "step-000050" / ".my-notes").unlink()
    assert ckpt.foreign_files(root / "step-000050") == []
    _fake(tmp_path, 60, None)

    ckpt.prune(tmp_path, keep_last=1)
    out = capsys.readouterr().out.splitlines()
    notes = [ln for ln in out if ln.startswith("note: kept the old checkpoint")]
    assert len(notes) == 2, out
    assert "step-000010" in notes[0] and "eval/results.json" in notes[0]
    assert "step-000020" in notes[1] and "notes.txt" in notes[1]
    assert (root / "step-000010" / "eval" / "results.json").read_text() == "{}"
    assert (root / "step-000020" / "notes.txt").read_text() == "lr spike here"
    # the kept ones stay whole and older: the latest is still the newest, and pruning again deletes nothing
    # else, says nothing again, and never drops a newer checkpoint in their place
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010", "step-000020", "step-000060"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000060"
    assert verify_checksums(root / "step-000010")  # untouched: what training wrote is all still there
    _fake(tmp_path, 70, None)
    ckpt.prune(tmp_path, keep_last=1)
    assert "note:" not in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010", "step-000020", "step-000070"]
    index = json.loads((root / "index.json").read_text())
    assert index["latest"] == "step-000070" and index["kept"] == ["step-000010", "step-000020", "step-000070"]
    # once the user moves their file out, the next prune removes the checkpoint
    (root / "step-000020" / "notes.txt").unlink()
    ckpt.prune(tmp_path, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010", "step-000070"]


def test_optimizer_state_round_trips_by_name(tmp_path):
    torch.manual_seed(0)
    cfg = model_preset("tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40, tie_embeddings=True)
    model = Z2all(cfg)
    opt = make_optimizer(model, OptimConfig(), torch.device("cpu"))
    x = torch.randint(0, 40, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    sd = ckpt.full_optimizer_state(model, opt, fsdp=False)
    assert "tok_embeddings.weight" in sd["state"] and "output.weight" not in sd["state"]  # tied: stored once
    torch.save(sd, tmp_path / "optimizer.pt")
    model2 = Z2all(cfg)
    opt2 = make_optimizer(model2, OptimConfig(), torch.device("cpu"))
    ckpt.load_optimizer_state(model2, opt2, tmp_path, fsdp=False)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in a["state"][k])


def test_wrapped_disk_full_becomes_an_os_error_and_stale_temps_go(tmp_path):
    # safetensors reports a full disk as SafetensorError("... No space left on device (os error 28)")
    e = ckpt._as_os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                          tmp_path)
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == str(tmp_path)
    other = ValueError("something else")
    assert ckpt._as_os_error(other, tmp_path) is other
    # temp dirs of killed saves (our names only) are removed; anything else in checkpoints/ stays
    root = ckpt.ckpt_root(tmp_path)
    for name in (".step-000010.ab12.tmp", ".step-000010.old-77", ".tmp-step-000020-5", "step-000030.corrupt",
                 ".mine"):
        (root / name).mkdir(parents=True)
    assert ckpt.remove_stale_temps(tmp_path) == 3
    assert sorted(p.name for p in root.iterdir()) == [".mine", "step-000030.corrupt"]
