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
    checksums.json                          sha256 of every file above (`z2all.io.write_checksums`)
`<run>/checkpoints/index.json` names the latest and the best (lowest val loss) checkpoint.

Atomicity: rank 0 writes everything into a temp dir beside the final one (`z2all.io.atomic_dir`) and
renames it into place, so a crash (SIGKILL, power loss) leaves either the previous checkpoints or the
complete new one, never half. A save that fails (disk full) removes its temp dir and leaves the earlier
checkpoints as they were; the error reaches the user as an OSError ("disk full"), never as the
RuntimeError/SafetensorError that torch.save and safetensors wrap it in. Retention: the last `keep_last`
checkpoints plus the best by validation loss; the rest are deleted after the new one is in place, except a
checkpoint holding files training did not write (`z2all eval --ckpt RUN`'s default eval/, a user's notes):
that one is kept whole, complete as it is, and the run says which file kept it so the user can remove it.

Integrity: `--resume` takes the newest checkpoint whose files match its checksums (`intact_checkpoint`);
newer ones that do not (a truncated optimizer.pt, a damaged model.safetensors) are renamed to
`step-N.corrupt` (kept for inspection, no longer counted by retention) and the run says so.

Resume limits: the data position is a step number and the loader draws global sample indices, so the
process count may change if the global batch (processes × accumulation × batch size) stays the same.
Per-rank RNG states are restored only when the process count matches (otherwise each rank reseeds from
seed, rank and step; only dropout would notice). PowerSGD error feedback is not saved. Under FSDP2 the
full weights and optimizer state are gathered to rank 0's CPU memory to be written (~16 bytes per
parameter: fine for the 1-2B models here; a 7B+ run would want sharded DCP checkpoints instead). A
checkpoint written by DDP resumes under FSDP2 and back, as the files are the same.
"""

from __future__ import annotations

import contextlib
import errno
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

from z2all.io import atomic_dir, atomic_write_json, unlisted_files, verify_checksums, write_checksums
from z2all.utils import UserError, print0

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
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is corrupt (not a JSON object)")
    return state


# ---------------------------------------------------------------- integrity

_REQUIRED = ("model.safetensors", "model_config.json", "optimizer.pt", "rng.pt", "state.json")


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why `ckpt` cannot be resumed from (one line naming the bad file), or None when it is intact: every
    file matches checksums.json; a checkpoint of an older z2all (no checksums) gets the cheap checks only
    (files present, state.json parses, the safetensors header covers the file)."""
    ckpt = Path(ckpt)
    for name in _REQUIRED:
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    try:
        if verify_checksums(ckpt):
            read_state(ckpt)
            return None
        read_state(ckpt)
    except UserError as e:
        return str(e)
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
        return f"{ckpt / 'model.safetensors'} is corrupt or truncated ({e})"
    return None


def intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run (or None) and the (checkpoint, problem) of every newer one."""
    bad = []
    for p in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(p)
        if problem is None:
            return p, bad
        bad.append((p, problem))
    return None, bad


def set_aside(ckpt: Path) -> Path:
    """Rename a corrupt checkpoint to `step-N.corrupt` (or `.corrupt-2`, ...): out of `list_checkpoints`
    and retention, still there for the user to inspect."""
    target, n = ckpt.with_name(ckpt.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.corrupt-{n}")
    os.replace(ckpt, target)
    return target


_TEMP_RE = re.compile(r"^\.(tmp-step-\d+-\d+|step-\d+\..*\.tmp|step-\d+\.old-\d+|old-step-\d+-\d+)$")


def remove_stale_temps(run_dir: str | os.PathLike) -> int:
    """Remove the temp dirs of saves that were killed mid-way (only names our saves use); returns how many."""
    root, n = ckpt_root(run_dir), 0
    if root.is_dir():
        for p in root.iterdir():
            if _TEMP_RE.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


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


def _load_pt(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # a truncated zip archive, a pickle error: the file is not what we wrote
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None


def load_rng_states(ckpt: str | os.PathLike) -> list:
    return _load_pt(Path(ckpt) / "rng.pt")


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: str | os.PathLike,
                         fsdp: bool) -> None:
    sd = _load_pt(Path(ckpt) / "optimizer.pt")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(_names(model, optimizer))}
    missing = sorted(set(index) - set(n for g in sd["param_groups"] for n in g["params"]))
    if missing:
        raise UserError(f"{ckpt}/optimizer.pt has no state for {', '.join(missing[:5])}: a different model?")
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
    state = {**state, "step": step, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        # re-saving a step (the final save after an interval save) swaps the old dir out only at the end
        with atomic_dir(final) as tmp:
            save_model(model_to_save, tmp, state_dict=model_state)
            _torch_save(optim_state, tmp / "optimizer.pt")
            _torch_save(rng_states, tmp / "rng.pt")
            atomic_write_json(tmp / "config.json", config)
            if tokenizer_dir and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            atomic_write_json(tmp / "state.json", state)
            write_checksums(tmp)  # last: it covers every file above
            _fsync_dir(tmp)
    except (OSError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise _as_os_error(e, root) from e
    _fsync_dir(root)
    prune(run_dir, keep_last)
    return final


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object: given a path, torch's C++ writer turns a full disk into
    "RuntimeError: unexpected pos"; through a file object the write fails with the real OSError (ENOSPC)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _as_os_error(e: Exception, where: Path) -> Exception:
    """The OSError a library wrapped (safetensors: "... (os error 28)"; torch: "file write failed") as one,
    so the CLI can say "disk full"; anything else is returned unchanged."""
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(where))
    with contextlib.suppress(OSError):
        if shutil.disk_usage(where).free < (1 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    return e


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
        try:
            v = read_state(p).get("val_loss")
        except UserError:  # a corrupt state.json is never the best
            continue
        if v is not None and v < best_loss:
            best, best_loss = p, v
    return best


# what a checkpoint written before checksums.json held (save_checkpoint's files; tokenizer/ is a copied tree)
_LEGACY_FILES = (*_REQUIRED, "config.json", "checksums.json")


def foreign_files(ckpt: str | os.PathLike) -> list[str]:
    """Files (relative paths) in checkpoint `ckpt` that training did not write, e.g. `z2all eval`'s eval/ or
    a user's notes (io.unlisted_files: its manifest, else its checksums.json; for a checkpoint older than
    both, the files save_checkpoint writes and its tokenizer/ copy)."""
    d = Path(ckpt)
    tok = d / "tokenizer"
    legacy = [*_LEGACY_FILES, *(p.relative_to(d).as_posix() for p in tok.rglob("*"))] if tok.is_dir() else _LEGACY_FILES
    return unlisted_files(d, legacy)


_reported: set[tuple[str, tuple[str, ...]]] = set()  # kept checkpoints already named by this process


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep the last `keep_last` checkpoints and the best by val loss; rewrite index.json. An older one
    that holds files training did not write is kept too (deleting it would delete them), said once per
    process: it stays complete, so it is still a valid, just older, checkpoint for `latest`/`best`."""
    ckpts = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts)
    if best is not None:
        keep.add(best)
    for p in ckpts:
        if p in keep:
            continue
        foreign = foreign_files(p)
        if foreign:
            keep.add(p)
            key = (str(p), tuple(foreign))
            if key not in _reported:
                _reported.add(key)
                shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} files)" if len(foreign) > 3 else "")
                print0(f"note: kept the old checkpoint {p} (retention would delete it) because it holds files "
                       f"training did not write ({shown}); move them out or remove the checkpoint yourself")
            continue
        shutil.rmtree(p, ignore_errors=True)
    latest = ckpts[-1] if ckpts else None
    index = {"latest": latest.name if latest else None, "best": best.name if best else None,
             "best_val_loss": read_state(best).get("val_loss") if best else None,
             "kept": sorted(p.name for p in keep)}
    atomic_write_json(ckpt_root(run_dir) / "index.json", index)
