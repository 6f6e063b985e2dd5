"""Checkpoints that resume exactly: weights, optimizer state, schedule position, data position, RNG states,
the resolved config and a copy of the tokenizer, written atomically.

Layout of `<run>/checkpoints/step-000100/`:
    model.safetensors, model_config.json    `z2all.model.save_model` (what generate/export read)
    optimizer.pt                            AdamW state, keyed by parameter name (the full, unsharded
                                            `get_optimizer_state_dict` form, so DDP and FSDP2 runs and any
                                            process count read the same file)
    rng.pt                                  python / numpy / torch CPU / CUDA RNG states, one entry per rank
    state.json                              step, data position (next step, seed, global batch), LR, val loss,
                                            world size and accumulation it was written with
    config.json                             the resolved training config
    tokenizer/                              a copy of the tokenizer dir of the token files (generate, export)
`<run>/checkpoints/index.json` names the latest and the best (lowest val loss) checkpoint.

Atomicity: rank 0 writes everything into `checkpoints/.tmp-step-.../` and renames it into place, so a
crash (SIGKILL, power loss) leaves either the previous checkpoints or the complete new one, never half.
Retention: the last `keep_last` checkpoints plus the best by validation loss; the rest are deleted after
the new one is in place.

Resume limits: the data position is a step number and the loader draws global sample indices, so the
process count may change if the global batch (processes × accumulation × batch size) stays the same.
Per-rank RNG states are restored only when the process count matches (otherwise each rank reseeds from
seed, rank and step; only dropout would notice). PowerSGD error feedback is not saved. Under FSDP2 the
full weights and optimizer state are gathered to rank 0's CPU memory to be written (~16 bytes per
parameter: fine for the 1-2B models here; a 7B+ run would want sharded DCP checkpoints instead). A
checkpoint written by DDP resumes under FSDP2 and back, as the files are the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from z2all.io import atomic_write_text

STEP_RE = re.compile(r"^step-(\d+)$")


def ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs of an interrupted save are ignored)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: str | os.PathLike) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- model and optimizer state (collective)

def _sd_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter name of each optimizer slot, in the optimizer's order (DDP's `module.` prefix dropped)."""
    by_id = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The unsharded optimizer state keyed by parameter name (the `get_optimizer_state_dict` format).
    Under FSDP2 it is a collective (every rank calls it; only rank 0 receives the tensors). Without FSDP
    the same format is built directly: torch.distributed.checkpoint costs ~4 s of imports per process."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_sd_options())
    sd = optimizer.state_dict()
    names = _names(model, optimizer)
    groups, i = [], 0
    for g in sd["param_groups"]:
        groups.append({**g, "params": names[i:i + len(g["params"])]})
        i += len(g["params"])
    state = {names[k]: {n: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for n, v in st.items()}
             for k, st in sd["state"].items()}
    return {"state": state, "param_groups": groups}


def full_model_state(model: torch.nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_sd_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: str | os.PathLike,
                         fsdp: bool) -> None:
    sd = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    missing = sorted(set(index) - set(n for g in sd["param_groups"] for n in g["params"]))
    if missing:
        raise ValueError(f"{ckpt}/optimizer.pt has no state for {', '.join(missing[:5])}: a different model?")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups})


# ---------------------------------------------------------------- save / prune

def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_to_save: torch.nn.Module,
                    model_state: dict | None, optim_state: dict, state: dict, rng_states: list, config: dict,
                    tokenizer_dir: str | os.PathLike | None, keep_last: int) -> Path:
    """Rank 0 only: write the checkpoint of `step` atomically, update index.json, prune old ones.
    `model_state` is the full state dict gathered from FSDP2 shards (None: `model_to_save.state_dict()`)."""
    from z2all.model.llama import save_model

    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model_to_save, tmp, state_dict=model_state)
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n")
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    state = {**state, "step": step, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    # state.json last: a dir without it is never taken for a checkpoint
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=2) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final save after an interval save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    prune(run_dir, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    best, best_loss = None, float("inf")
    for p in list_checkpoints(run_dir):
        v = read_state(p).get("val_loss")
        if v is not None and v < best_loss:
            best, best_loss = p, v
    return best


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep the last `keep_last` checkpoints and the best by val loss; rewrite index.json."""
    ckpts = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts)
    if best is not None:
        keep.add(best)
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    latest = ckpts[-1] if ckpts else None
    index = {"latest": latest.name if latest else None, "best": best.name if best else None,
             "best_val_loss": read_state(best).get("val_loss") if best else None,
             "kept": sorted(p.name for p in keep)}
    atomic_write_text(ckpt_root(run_dir) / "index.json", json.dumps(index, indent=2) + "\n")
