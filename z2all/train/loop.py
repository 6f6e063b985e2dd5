"""The training loop every objective shares; pretraining (`z2all train`, pretrain.py) is one objective.

An `Objective` supplies only what is particular to it: the model to build, the micro-batches of an
optimizer step, the loss of one micro-batch, validation batches, optional samples, and the state a resume
must match. `train_loop(cfg, info, objective)` owns everything else:

- setup: the run directory (claimed, never a user's; a fresh start over an earlier run refused), the resume
  point (newest intact checkpoint; model shape, seed, tokenizer and the objective's state checked), device placement,
  activation checkpointing, compile, DDP/FSDP2 wrapping, AdamW, the warmup+cosine schedule, RNG states;
- one optimizer step: `grad_accum` micro-batches, each loss divided by grad_accum, gradient sync on the last
  only (no_sync before), clip, a finite check (a NaN/inf loss or norm skips the update; `train.max_bad_steps`
  in a row stop the run with the last good checkpoint untouched), step;
- evaluation: the objective's validation loss (each batch weighted by what its mean is over, summed over the
  processes: the loss over the whole val set, whatever the batching) and samples, and (when `eval.bpb_max_tokens` /
  `eval.tasks_max_items` are set, z2all/eval/intrain.py) bits per byte and "which continuation?" accuracy
  per held-out domain, scored by rank 0 without touching any RNG or the data order;
- checkpoints (interval, final, retention), metrics (metrics.jsonl, TensorBoard, tokens/s, MFU),
  Ctrl-C/SIGTERM/time budget: finish the step, save, exit (status 130 after a signal).

`cfg` is duck-typed: it needs out_dir, seed, dtype, resume, optim, train, eval.every, ckpt, dist, metrics
(pretrain.Config has them); it is saved, resolved, into config.json and each checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from z2all.config import save_config, to_dict
from z2all.eval import intrain
from z2all.io import claim_output_dir, read_owner, sha256_file
from z2all.model.config import ModelConfig
from z2all.train import checkpoint as ckpt_mod
from z2all.train import distributed as dist_mod
from z2all.train.metrics import MetricsWriter, device_peak_flops, fmt_mfu, mfu, peak_memory_bytes, truncate_metrics
from z2all.train.optim import lr_at, make_optimizer, set_lr
from z2all.utils import UserError, human_bytes, pick_dtype, print0, seed_everything


class Objective:
    """What a training objective gives the loop. Attributes set by the subclass:
    `model_config` (the ModelConfig it trains), `grad_accum` (micro-batches per optimizer step on each
    process), `tokens_per_step` (global, for throughput and MFU), `protect` (input paths the run directory
    must not contain), `tokenizer_dir` (copied into checkpoints, or None), `command` (the owner name the run
    directory is claimed for: a `z2all sft` run dir is never resumed by `z2all train`, nor the reverse),
    `tokenizer_from` (where tokenizer_dir came from, for messages)."""

    command: str = "train"
    model_config: ModelConfig
    grad_accum: int = 1
    tokens_per_step: int = 0
    protect: tuple = ()
    tokenizer_dir: Path | None = None
    tokenizer_from: str = "--tokenizer"
    val_ppl: bool = True  # the val loss is a per-token cross-entropy, so exp(loss) is a perplexity (not DPO's)
    heldout_dir: Path | None = None  # default --eval.heldout: a tokenize output whose val documents are scored
    eval_window: int = 0  # tokens per window of the held-out scores (the training row length); 0 = max_seq_len

    def build_model(self) -> torch.nn.Module:
        """The freshly initialised single-device model (the loop seeds the RNG first and loads a checkpoint
        into it on resume)."""
        raise NotImplementedError

    def micro_batch(self, step: int, micro: int) -> Any:
        """This process's micro-batch `micro` of optimizer step `step` (a pure function of both)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """The mean loss of one micro-batch (called under autocast)."""
        raise NotImplementedError

    def eval_loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        """(mean loss, count) of one validation batch (under autocast, no grad): the count is what the mean
        is over (tokens with a label, pairs), so the val loss is the mean over the whole val set and not a mean
        of batch means that changes with batch size or packing. The default weighs every batch alike: an
        objective whose batches differ in size must override it."""
        return self.loss(model, batch, device), 1

    def eval_batches(self) -> Iterable | None:
        """Validation micro-batches (the same on every call and rank), or None when there is no validation."""
        return None

    def sample(self, model: torch.nn.Module, device: torch.device, autocast, step: int) -> list[str] | dict:
        """Sample texts for the log after an evaluation (rank 0, single-device model); or a dict of fields
        for the "sample" metrics record (e.g. {"samples": [...], "exact_match": 0.5})."""
        return []

    def flops_per_token(self, model: torch.nn.Module) -> float:
        return 0.0

    def describe(self, model: torch.nn.Module) -> str:
        """One line about the model for the log."""
        return f"{model.num_params() / 1e6:.2f}M parameters"

    def resume_state(self) -> dict:
        """Saved into each checkpoint's state.json; `check_resume` compares a resume against it."""
        return {}

    def check_resume(self, ckpt: Path, state: dict) -> None:
        """Raise UserError when the checkpoint cannot be resumed exactly by this objective."""

    def config_extras(self) -> dict:
        """Extra provenance for config.json."""
        return {}

    def checkpoint_weights(self, model: torch.nn.Module) -> dict | None:
        """The tensors a checkpoint's model.safetensors holds; None = the whole model (LoRA: the adapters)."""
        return None

    def load_weights(self, model: torch.nn.Module, ckpt: Path) -> None:
        """Fill the freshly built model from a checkpoint on resume."""
        from z2all.model.llama import load_model

        model.load_state_dict(load_model(ckpt).state_dict())

    def step_metrics(self) -> dict:
        """Extra fields for the "train" metrics record (e.g. DPO's reward accuracy since the last log)."""
        return {}


class TrainingDiverged(UserError):
    """Too many NaN/inf steps in a row."""


class StopFlag:
    """Set by SIGINT (Ctrl-C) or SIGTERM (torchrun, schedulers, preemption); the loop finishes its step,
    saves and exits. A second Ctrl-C aborts without saving; further SIGTERMs are ignored (torchrun sends one
    after forwarding Ctrl-C, and waits before killing)."""

    def __init__(self):
        self.set = False
        self.interrupted = False
        self._old: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test harness): no handler
                pass

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        if not self.set:
            self.set = True
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print0(f"\n{name}: finishing this step and saving a checkpoint (Ctrl-C again aborts without saving)",
                   force=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- run directory and resume point

def _is_legacy_run_dir(path: Path) -> bool:
    """A run dir an older z2all wrote (before owner files): a checkpoint index, or metrics + config."""
    return (path / "checkpoints" / "index.json").is_file() or (
        (path / "metrics.jsonl").is_file() and (path / "config.json").is_file())


def run_dir_lock(out_dir, info, command: str):
    """Rank 0 holds the run directory for the whole run (z2all.io.dir_lock): a second `z2all train`, `sft`
    or `dpo` on the same --out_dir, resumed or not, is refused in one line naming the first instead of the
    two interleaving checkpoints, pruning each other's and mixing metrics.jsonl. Only rank 0 writes there."""
    import contextlib

    from z2all.io import dir_lock

    return dir_lock(out_dir, command, "--out_dir") if info.is_main else contextlib.nullcontext()


def prepare_run_dir(run_dir: Path, protect: Iterable, resume: bool, command: str = "train") -> None:
    """Rank 0, before anything is written: claim `run_dir` for `z2all train` (new, empty, or a train run
    dir; never one holding an input), refuse a fresh start over an earlier run (its metrics and checkpoints
    would be mixed with the new ones), and for --resume set aside corrupt checkpoints newer than the newest
    intact one, saying so."""
    owner = read_owner(run_dir) if run_dir.is_dir() else None
    ours = owner == command or (owner is None and command == "train" and run_dir.is_dir()
                                and _is_legacy_run_dir(run_dir))
    ckpts = ckpt_mod.list_checkpoints(run_dir) if ours else []
    if ours and not resume:  # refused before claiming, so not even the owner file is added
        earlier = [x for x, there in (("checkpoints", ckpts), ("metrics.jsonl", (run_dir / "metrics.jsonl").is_file()))
                   if there]
        if earlier:
            raise UserError(f"--out_dir {run_dir} already holds a training run ({', '.join(earlier)}): pass --resume "
                            "to continue it, or choose another --out_dir (nothing was changed)")
    claim_output_dir(run_dir, command, option="--out_dir", protect=list(protect),
                     legacy=_is_legacy_run_dir if command == "train" else None)
    if resume and ckpts:
        good, bad = ckpt_mod.intact_checkpoint(run_dir)
        if good is None:
            raise UserError(f"--resume: no intact checkpoint in {run_dir / 'checkpoints'}: {bad[0][1]}"
                            + (f" (and {len(bad) - 1} older ones are damaged too)" if len(bad) > 1 else "")
                            + "; nothing was changed")
        for path, problem in bad:
            moved = ckpt_mod.set_aside(path)
            print0(f"warning: {problem}; resuming from {good.name} instead ({path.name} set aside as {moved.name})",
                   file=sys.stderr)
    elif resume:
        print0(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
    ckpt_mod.remove_stale_temps(run_dir)  # what saves killed mid-way left behind


_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "multiple_of", "norm_eps",
                 "rope_theta", "max_seq_len", "tie_embeddings")


def check_resume_model(ckpt: Path, mcfg: ModelConfig) -> None:
    """The model the options describe must be the checkpoint's (dropout and init_std may change)."""
    from z2all.model.llama import load_model_config

    saved = load_model_config(ckpt)
    diff = [f for f in _SHAPE_FIELDS if getattr(saved, f) != getattr(mcfg, f)
            and not (f in ("ffn_dim", "multiple_of") and saved.ffn_hidden == mcfg.ffn_hidden)]
    if diff:
        was = " ".join(f"--model.{f}={getattr(saved, f)}" for f in diff)
        now = ", ".join(f"{f}={getattr(mcfg, f)}" for f in diff)
        raise UserError(f"--resume: {ckpt} holds a model with {was.replace('--model.', '')} but the options give "
                        f"{now}; resume with the run's shape ({was}) or start a new run in another --out_dir")


def tokenizer_sha256(tok_dir: Path | None) -> str | None:
    """sha256 of the tokenizer.json a run trains with (recorded in each checkpoint's state), or None."""
    f = Path(tok_dir) / "tokenizer.json" if tok_dir else None
    return sha256_file(f) if f is not None and f.is_file() else None


def check_resume_run(ckpt: Path, state: dict, seed: int, objective: Objective, tok_sha: str | None) -> None:
    """What every objective's resume must keep besides its own state: the seed (it fixes the data order and
    dropout) and the tokenizer (token files stay byte-identical when the tokenizer is retrained in place, yet
    their ids would then mean other text). A checkpoint that recorded no tokenizer hash is not checked."""
    if "seed" in state and state["seed"] != seed:
        raise UserError(f"--resume: {ckpt} was trained with --seed={state['seed']}, now --seed={seed} (the data "
                        f"order would change mid-run); resume with --seed={state['seed']} or start a new run in "
                        "another --out_dir")
    was = state.get("tokenizer_sha256")
    if was and tok_sha and was != tok_sha:
        raise UserError(f"--resume: the tokenizer {objective.tokenizer_dir} (from {objective.tokenizer_from}) is not "
                        f"the one {ckpt} was trained with (tokenizer.json sha256 {was[:12]}... then, {tok_sha[:12]}... "
                        f"now); restore the run's tokenizer (a copy is in {ckpt / 'tokenizer'}) or start a new run in "
                        "another --out_dir")


def _build_heldout(cfg, info, objective: Objective):
    """The in-training held-out scorer on rank 0 (None elsewhere, or when off); errors agreed by all ranks."""
    opts = cfg.eval
    intrain.validate_options(opts)
    if not intrain.enabled(opts):
        return None
    built, err = None, None
    if info.is_main:
        try:
            built = intrain.build(opts, objective.heldout_dir, objective.tokenizer_dir,
                                  objective.eval_window, seed=1234)
        except UserError as e:
            err = str(e)
    err = next((e for e in dist_mod.all_gather_object(err) if e), None)
    if err:
        raise UserError(err)
    return built


# ---------------------------------------------------------------- one optimizer step

def accumulate(model, objective: Objective, step: int, device: torch.device, autocast) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step over the objective's `grad_accum` micro-batches, each
    loss divided by grad_accum, gradient sync only on the last (no_sync before). Returns the mean micro-batch
    loss of this process (a 0-dim fp32 tensor, not synchronised)."""
    n = objective.grad_accum
    loss_sum = torch.zeros((), device=device)
    for micro in range(n):
        batch = objective.micro_batch(step, micro)
        with dist_mod.sync_context(model, micro == n - 1):
            with autocast:
                loss = objective.loss(model, batch, device)
            (loss / n).backward()  # outside autocast: backward runs in the forward's dtypes anyway
        loss_sum += loss.detach().float()
    return loss_sum / n


# ---------------------------------------------------------------- the loop

def train_loop(cfg, info, objective: Objective) -> int:
    device = info.device
    run_dir = Path(cfg.out_dir)
    mcfg = objective.model_config
    tokens_per_iter = objective.tokens_per_step

    # ---- held-out scores: documents and items read once by rank 0, before anything is written, and a
    # problem with them is the same UserError on every rank (the others would wait at a collective)
    heldout = _build_heldout(cfg, info, objective)

    # ---- the run directory and the resume point: rank 0 claims the dir and sets corrupt checkpoints aside,
    # then every rank reads the same (newest intact) checkpoint
    if info.is_main:
        prepare_run_dir(run_dir, objective.protect, cfg.resume, objective.command)
    dist_mod.barrier()
    ckpt = ckpt_mod.latest_checkpoint(run_dir) if cfg.resume else None
    state = ckpt_mod.read_state(ckpt) if ckpt else {}
    tok_sha = tokenizer_sha256(objective.tokenizer_dir)
    if ckpt:
        objective.check_resume(ckpt, state)
        check_resume_model(ckpt, mcfg)
        check_resume_run(ckpt, state, cfg.seed, objective, tok_sha)

    # ---- model: same init on every rank (DDP also broadcasts rank 0's), then placement and wrapping
    seed_everything(cfg.seed)
    model = objective.build_model()
    if ckpt:
        objective.load_weights(model, ckpt)
    model.to(device)
    amp_dtype = pick_dtype(cfg.dtype, device)
    if cfg.train.activation_checkpointing:
        dist_mod.apply_activation_checkpointing(model)
    if cfg.train.compile:
        dist_mod.apply_compile(model)
    wrapped = dist_mod.wrap_model(model, info, cfg.dist, amp_dtype)
    fsdp = dist_mod.is_fsdp(wrapped)
    if fsdp and heldout is not None:
        print0("note: the held-out scores (eval.bpb_max_tokens / eval.tasks_max_items) are skipped under FSDP: "
               "score the checkpoints with `z2all eval --heldout` instead")
        heldout = None
    elif heldout is not None:
        print0(heldout.describe())
    optimizer = make_optimizer(wrapped, cfg.optim, device)
    start = 0
    if ckpt:
        ckpt_mod.load_optimizer_state(wrapped, optimizer, ckpt, fsdp)
        start = int(state["step"])
        rngs = ckpt_mod.load_rng_states(ckpt)
        if len(rngs) == info.world_size:
            ckpt_mod.set_rng_state(rngs[info.rank])
        else:
            seed_everything(cfg.seed + 1000003 * info.rank + start)
        print0(f"resumed from {ckpt} at step {start} (saved with {state['world_size']} processes x "
               f"{state['grad_accum']} accumulation; now {info.world_size} x {objective.grad_accum})")
    elif info.rank:
        seed_everything(cfg.seed + 1000003 * info.rank)  # dropout differs per rank; rank 0 keeps the init stream

    flops_tok = objective.flops_per_token(model)
    peak = device_peak_flops(device, cfg.metrics.peak_tflops)
    print0(f"model: {objective.describe(model)}")
    extras = "".join([", compile" if cfg.train.compile else "",
                      ", activation checkpointing" if cfg.train.activation_checkpointing else ""])
    print0(f"device: {device} x {info.world_size}, autocast {amp_dtype}, strategy "
           f"{'single' if not info.distributed else cfg.dist.strategy}{extras}; "
           f"peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")

    writer = None
    if info.is_main:
        save_config(cfg, run_dir / "config.json", model_config=to_dict(mcfg), world_size=info.world_size,
                    **objective.config_extras())
        truncate_metrics(run_dir, start)  # a resume redoes the steps after its checkpoint (all of them: none)
        writer = MetricsWriter(run_dir, cfg.metrics.tensorboard)

    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype != torch.float32
                else nullcontext())
    params = [p for p in wrapped.parameters() if p.requires_grad]

    def evaluate(step: int) -> float | None:
        val = validate(step)
        if heldout is not None:  # rank 0 only (None elsewhere); the single-device module, RNG untouched
            rec = heldout(model, autocast)
            writer.log({"kind": "heldout", "step": step, **rec})
            print0(intrain.summary(rec))
        return val

    def validate(step: int) -> float | None:
        batches = objective.eval_batches()
        if batches is None:
            return None
        wrapped.eval()
        # [sum of mean x count, count] on this process; summed over the processes (whose shares of the val set
        # may differ in size), their ratio is the mean over every counted token or pair
        sums, n = torch.zeros(2, device=device), 0
        with torch.no_grad(), autocast:
            for batch in batches:
                mean, count = objective.eval_loss(wrapped, batch, device)
                if count:  # a batch with nothing counted has a NaN mean (0/0) and no weight
                    sums[0] += mean.float() * count
                    sums[1] += count
                n += 1
        dist_mod.reshard(wrapped)
        wrapped.train()
        sums = dist_mod.all_reduce_sum(sums)
        val = float(sums[0] / sums[1]) if float(sums[1]) > 0 else float("nan")
        if info.is_main:
            rec = {"kind": "val", "step": step, "val_loss": val}
            ppl = ""
            if objective.val_ppl:
                rec["val_ppl"] = math.exp(min(val, 50))
                ppl = f" (ppl {rec['val_ppl']:.1f})"
            writer.log(rec)
            print0(f"step {step}: val loss {val:.4f}{ppl} over {n} batches")
            if not fsdp:  # sampling calls the single-device model; FSDP2 shards need every rank
                texts = objective.sample(model, device, autocast, step)
                if isinstance(texts, dict):
                    writer.log({"kind": "sample", "step": step, **texts})
                elif texts:
                    writer.log({"kind": "sample", "step": step, "samples": texts})
        return val

    def save(step: int, val_loss: float | None) -> Path | None:
        t0 = time.perf_counter()
        optim_state = ckpt_mod.full_optimizer_state(wrapped, optimizer, fsdp)
        full = ckpt_mod.full_model_state(wrapped) if fsdp else None  # collective: every rank
        part = objective.checkpoint_weights(model)
        if part is not None:
            full = {k: v for k, v in (full or {}).items() if k in part} if fsdp else part
        rngs = dist_mod.all_gather_object(ckpt_mod.rng_state())
        path = None
        if info.is_main:
            st = {"next_step": step, **objective.resume_state(), "world_size": info.world_size,
                  "grad_accum": objective.grad_accum, "seed": cfg.seed, "tokenizer_sha256": tok_sha,
                  "lr": lr_at(max(step - 1, 0), cfg.optim, cfg.train.max_steps),
                  "val_loss": val_loss, "tokens_seen": step * tokens_per_iter}
            path = ckpt_mod.save_checkpoint(run_dir, step, model_to_save=model, model_state=full,
                                            optim_state=optim_state, state=st, rng_states=rngs,
                                            config={"config": to_dict(cfg), "model_config": to_dict(mcfg)},
                                            tokenizer_dir=objective.tokenizer_dir, keep_last=cfg.ckpt.keep_last)
            print0(f"saved {path} ({time.perf_counter() - t0:.1f} s)")
        dist_mod.barrier()
        return path

    stop = StopFlag()
    stop.install()
    t_start = time.perf_counter()
    bad_in_row, skipped, last_val = 0, 0, None
    step = start
    last_saved = start if ckpt else None
    status = 0
    try:
        wrapped.train()
        t_last, interval_steps = time.perf_counter(), 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for it in range(start, cfg.train.max_steps):
            lr = lr_at(it, cfg.optim, cfg.train.max_steps)
            set_lr(optimizer, lr)
            mean_loss = accumulate(wrapped, objective, it, device, autocast)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            over_time = cfg.train.time_budget_s > 0 and time.perf_counter() - t_start >= cfg.train.time_budget_s
            # one small all-reduce carries the loss (for the log and the NaN check) and every rank's stop vote
            packed = torch.stack([mean_loss, torch.tensor(float(stop.set or over_time), device=device)])
            packed = dist_mod.all_reduce_mean(packed)
            step_loss, stop_vote = float(packed[0]), float(packed[1])
            grad_norm = float(norm)
            done = it + 1
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
                skipped += 1
                what = " and ".join(f"{k} {v}" for k, v in (("loss", step_loss), ("grad norm", grad_norm))
                                    if not math.isfinite(v))
                print0(f"step {done}: non-finite {what}: update skipped "
                       f"({bad_in_row} in a row, {skipped} total)")
                if writer:
                    writer.log({"kind": "skip", "step": done, "loss": step_loss, "grad_norm": grad_norm})
                if bad_in_row >= cfg.train.max_bad_steps:
                    last = ckpt_mod.latest_checkpoint(run_dir)
                    raise TrainingDiverged(
                        f"the loss was NaN/inf for {bad_in_row} steps in a row (steps {done - bad_in_row + 1}.."
                        f"{done}); stopped without saving. Last good checkpoint: {last or 'none yet'}. Lower "
                        "optim.lr, raise optim.warmup_steps or check the data, then --resume")
                step = done
                if stop_vote > 0:
                    status = 130 if stop.set else 0
                    break
                continue
            bad_in_row = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = done

            interval_steps += 1
            if done % cfg.train.log_every == 0 or done == cfg.train.max_steps or done == start + 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                dt = (now - t_last) / max(interval_steps, 1)  # seconds per step since the last log
                t_last, interval_steps = now, 0
                tps = tokens_per_iter / dt
                m = mfu(flops_tok, tps, peak, info.world_size)
                mem = peak_memory_bytes(device)
                if writer:
                    writer.log({"kind": "train", "step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                "tokens_per_s": tps, "mfu": m, "step_time_s": dt, "peak_mem_bytes": mem,
                                "tokens": done * tokens_per_iter, "skipped": skipped,
                                "elapsed_s": time.perf_counter() - t_start, **objective.step_metrics()})
                print0(f"step {done}/{cfg.train.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} "
                       f"| {tps:,.0f} tok/s | MFU {fmt_mfu(m)} | mem {human_bytes(mem)} | {dt * 1000:.0f} ms/step")
            stopping = stop_vote > 0
            if cfg.eval.every and done % cfg.eval.every == 0 and done != cfg.train.max_steps and not stopping:
                last_val = evaluate(done)
            if cfg.ckpt.every and done % cfg.ckpt.every == 0 and done != cfg.train.max_steps and not stopping:
                save(done, last_val if cfg.eval.every and done % cfg.eval.every == 0 else None)
                last_saved = done
            if last_saved == done or (cfg.eval.every and done % cfg.eval.every == 0):
                t_last, interval_steps = time.perf_counter(), 0  # keep eval and save time out of tokens/s
            if stopping:
                why = "a signal (Ctrl-C / SIGTERM)" if stop.set else f"time budget of {cfg.train.time_budget_s:g} s"
                print0(f"stopping after step {done}: {why}")
                status = 130 if stop.set else 0
                break
        # the end (max_steps, time budget or Ctrl-C): evaluate and save unless nothing changed
        if step != last_saved:
            last_val = evaluate(step) if status == 0 else None
            save(step, last_val)
    finally:
        stop.restore()
        if writer:
            writer.close()
    if info.is_main:
        elapsed = time.perf_counter() - t_start
        print0(f"done: {step} steps in {elapsed:.1f} s"
               + (f", final val loss {last_val:.4f}" if last_val is not None else "")
               + (f", {skipped} skipped steps" if skipped else "")
               + f"; checkpoints in {run_dir / 'checkpoints'}, metrics in {run_dir / 'metrics.jsonl'}")
    return status
