"""`z2all train`: pretrain a Z2all model on token files, from one CPU to many GPUs.

    z2all train --config configs/demo_cpu.toml --data.dir=runs/demo/tokens --train.max_steps=300
    z2all train --config configs/demo_cpu.toml --resume          # continue the run in out_dir exactly
    torchrun --standalone --nproc_per_node=8 -m z2all train --config configs/gpu_1b.toml
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_HOST:29500 --rdzv_id=z2all -m z2all train --config configs/seed_a800.toml

One optimizer step ("iteration") = `data.grad_accum` micro-batches of `data.batch_size` x `data.seq_len`
tokens on each of the processes; the loss of every micro-batch is divided by grad_accum and DDP averages
over processes, so the gradient is the mean over the global batch whatever the split (2 processes x 1
micro-batch == 1 process x 2 micro-batches, up to fp32 summation order). The loader draws global sample
indices, so the samples of a step do not depend on the split either.

Per step: forward/backward under bf16 autocast on GPU (fp32 on CPU), gradient all-reduce on the last
micro-batch only (no_sync before), clip, AdamW with the warmup+cosine LR. A NaN/inf loss or gradient
norm skips the update (counted); `train.max_bad_steps` in a row stop the run with the last good checkpoint
untouched. Ctrl-C (SIGINT), SIGTERM or the time budget finish the current step, save a checkpoint and
exit (status 130 after a signal).

Model section: `model.preset` names a `z2all.model.config` preset and every other `model.<field>` that
is set overrides it (`--model.n_layers=2`); `model.vocab_size` defaults to the token files' vocabulary
(meta.json). `model.ops.*` picks the kernels (`--model.ops.preset=use_all`, `--model.ops.attention=triton`).

Outputs in `out_dir`: config.json (resolved), metrics.jsonl (+ tensorboard/), checkpoints/step-N/ (see
checkpoint.py), and train.log lines on the console (rank 0).

What is refused, each with one line naming the file or option: an `out_dir` that holds anything but a
`z2all train` run (or holds the token files); a fresh start into a dir with an earlier run's metrics or
checkpoints (pass --resume, or choose another dir); token files that do not match meta.json; a resume
whose model shape, global batch or training tokens differ from its checkpoint's; option values the loop
cannot use (NaN learning rate, ...). `--resume` skips a corrupt latest checkpoint for the newest intact
one and says so (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.config import opt, save_config, section, to_dict
from z2all.io import claim_output_dir, fingerprint, read_owner
from z2all.model.config import ModelConfig, model_preset
from z2all.ops import OpsConfig
from z2all.train import checkpoint as ckpt_mod
from z2all.train import distributed as dist_mod
from z2all.train.distributed import DistConfig
from z2all.train.metrics import MetricsWriter, device_peak_flops, fmt_mfu, mfu, peak_memory_bytes, truncate_metrics
from z2all.train.optim import OptimConfig, lr_at, make_optimizer, set_lr, validate_optim
from z2all.utils import UserError, human_bytes, pick_dtype, print0, seed_everything


@dataclass
class DataSection:
    dir: str = opt("runs/demo/tokens", "directory of token files (train-*.bin, val-*.bin, meta.json) written by "
                   "`z2all data tokenize`")
    batch_size: int = opt(8, "sequences per micro-batch on each process")
    seq_len: int = opt(256, "tokens per sequence")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step on each process; the global batch is "
                          "grad_accum x processes x batch_size sequences")


def _model_section() -> type:
    """`[model]`: a preset name, an optional override for every ModelConfig field (None = the preset's
    value), and the ops switch. Generated from ModelConfig so the two never drift apart."""
    hints = typing.get_type_hints(ModelConfig)
    fields: list = [("preset", str, opt("tiny", "model preset (z2all.model.config.PRESETS): tiny, 125m, 350m, 1b, "
                                        "1.7b, llama2-7b"))]
    for f in dataclasses.fields(ModelConfig):
        help_ = f.metadata["help"] + "; unset = the preset's value"
        if f.name == "vocab_size":
            help_ = "vocabulary size; unset = the token files' vocab_size (meta.json)"
        if f.name == "max_seq_len":
            help_ = "longest context; unset = max(the preset's, data.seq_len)"
        fields.append((f.name, hints[f.name] | None, opt(None, help_)))
    fields.append(("ops", OpsConfig, section(OpsConfig, "kernel per op: preset naive|use_all, or one op at a "
                                             "time (--model.ops.attention=triton)")))
    cls = dataclasses.make_dataclass("ModelSection", fields)
    cls.__module__ = __name__  # picklable (spawned DDP workers) as z2all.train.pretrain.ModelSection
    return cls


ModelSection = _model_section()


@dataclass
class TrainSection:
    max_steps: int = opt(1000, "optimizer steps to train for (the cosine schedule ends here unless "
                         "optim.decay_steps is set)")
    time_budget_s: float = opt(0.0, "stop after this many seconds of training (saving a checkpoint); 0 = none")
    compile: bool = opt(False, "torch.compile every block (first steps are slow while it compiles)")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward (less memory, "
                                         "about a third more compute)")
    log_every: int = opt(10, "print and record train metrics every this many steps")
    max_bad_steps: int = opt(5, "stop after this many NaN/inf steps in a row (each one is skipped)")


@dataclass
class EvalSection:
    every: int = opt(200, "validation loss every this many steps (and at the end); 0 = only at the end")
    max_batches: int = opt(20, "validation micro-batches per evaluation (per process)")
    samples: int = opt(2, "sample generations printed at each evaluation (0 = none)")
    sample_tokens: int = opt(48, "new tokens per sample generation")
    temperature: float = opt(0.8, "sampling temperature")
    top_k: int = opt(50, "sample from the k most likely tokens")
    prompts: list[str] = opt(None, "prompts for the samples (encoded with the token files' tokenizer); "
                             "default: the first tokens of validation sequences", factory=list)


@dataclass
class CkptSection:
    every: int = opt(500, "save a checkpoint every this many steps (and at the end); 0 = only at the end")
    keep_last: int = opt(2, "checkpoints kept besides the best by validation loss")


@dataclass
class MetricsSection:
    peak_tflops: float = opt(0.0, "dense bf16 peak TFLOP/s of one device for MFU; 0 = look up the GPU in "
                             "metrics.PEAK_BF16_TFLOPS")
    tensorboard: bool = opt(True, "also write TensorBoard scalars when tensorboard is installed")


@dataclass
class Config:
    out_dir: str = opt("runs/train", "run directory: config.json, metrics.jsonl, checkpoints/")
    seed: int = opt(1337, "seed for the model init, the data order and sampling")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (fresh start if there is none)")
    threads: int = opt(0, "CPU threads for torch ops; 0 = torch's default (all cores). On a shared or oversubscribed "
                       "machine 1 can be many times faster: spinning OpenMP threads starve each other")
    data: DataSection = section(DataSection, "token files and batch shape")
    model: ModelSection = section(ModelSection, "model shape: a preset plus overrides, and the kernels")
    optim: OptimConfig = section(OptimConfig, "AdamW and the learning-rate schedule")
    train: TrainSection = section(TrainSection, "loop length, compile, activation checkpointing, logging")
    eval: EvalSection = section(EvalSection, "validation loss and sample generations")
    ckpt: CkptSection = section(CkptSection, "checkpoint interval and retention")
    dist: DistConfig = section(DistConfig, "multi-process strategy (under torchrun)")
    metrics: MetricsSection = section(MetricsSection, "MFU peak and sinks")

    def validate(self) -> None:
        """Every value the loop cannot use is one UserError naming the option (--section.key=value)."""
        def get(key: str):
            sect, name = key.split(".")
            return getattr(getattr(self, sect), name)

        for key in ("data.batch_size", "data.seq_len", "data.grad_accum", "train.max_steps", "train.log_every",
                    "train.max_bad_steps", "ckpt.keep_last", "eval.max_batches", "dist.powersgd_rank",
                    "dist.bucket_cap_mb", "dist.timeout_s"):
            if get(key) <= 0:
                raise UserError(f"--{key}={get(key)}: must be positive")
        for key in ("eval.every", "ckpt.every", "eval.samples", "eval.sample_tokens", "eval.top_k",
                    "dist.powersgd_start_iter"):
            if get(key) < 0:
                raise UserError(f"--{key}={get(key)}: must be >= 0")
        for key in ("train.time_budget_s", "eval.temperature", "metrics.peak_tflops"):
            if not (math.isfinite(get(key)) and get(key) >= 0):
                raise UserError(f"--{key}={get(key)}: must be a finite number >= 0")
        if self.threads < 0:
            raise UserError(f"--threads={self.threads}: must be >= 0 (0 = torch's default)")
        if not self.out_dir:
            raise UserError("--out_dir is empty; give the run directory")
        validate_optim(self.optim)


def resolve_model_config(section_cfg, meta_vocab: int, seq_len: int) -> ModelConfig:
    """The preset plus every override that is set; vocab from the token files; context >= seq_len."""
    overrides = {f.name: getattr(section_cfg, f.name) for f in dataclasses.fields(ModelConfig)
                 if getattr(section_cfg, f.name) is not None}
    base = model_preset(section_cfg.preset)
    overrides.setdefault("vocab_size", meta_vocab)
    overrides.setdefault("max_seq_len", max(base.max_seq_len, seq_len))
    mcfg = model_preset(section_cfg.preset, **overrides)
    if mcfg.vocab_size < meta_vocab:
        raise UserError(f"model.vocab_size={mcfg.vocab_size} is smaller than the token files' vocabulary "
                        f"({meta_vocab}); unset model.vocab_size or raise it")
    if mcfg.max_seq_len < seq_len:
        raise UserError(f"data.seq_len={seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; raise "
                        "model.max_seq_len or lower data.seq_len")
    return mcfg


def tokenizer_dir_of(data_dir: Path, meta: dict) -> Path | None:
    """The tokenizer directory named in meta.json (absolute, or relative to the token dir), if it exists."""
    name = meta.get("tokenizer_dir")
    if not name:
        return None
    for cand in (Path(name), data_dir / name):
        if cand.is_dir():
            return cand.resolve()
    return None


class TrainingDiverged(UserError):
    """Too many NaN/inf steps in a row."""


class _StopFlag:
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


def run(cfg: Config) -> int:
    from z2all.data.loader import TokenLoader
    from z2all.model.llama import Z2all, load_model

    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist_mod.init_distributed(cfg.device, cfg.dist.timeout_s)
    try:
        return _train(cfg, info, TokenLoader, Z2all, load_model)
    finally:
        dist_mod.cleanup()
        torch.set_num_threads(old_threads)


def _train(cfg: Config, info, TokenLoader, Z2all, load_model) -> int:
    device = info.device
    run_dir = Path(cfg.out_dir)
    data_dir = Path(cfg.data.dir)
    d = cfg.data
    kw = dict(batch_size=d.batch_size, seq_len=d.seq_len, seed=cfg.seed, rank=info.rank,
              world_size=info.world_size, grad_accum=d.grad_accum)
    loader = TokenLoader(data_dir, "train", **kw)  # checks meta.json and the token files against it
    meta = loader.meta
    val_loader = TokenLoader(data_dir, "val", **kw) if meta.get("val_tokens", 0) > d.seq_len else None
    tok_dir = tokenizer_dir_of(data_dir, meta)
    mcfg = resolve_model_config(cfg.model, int(meta["vocab_size"]), d.seq_len)

    tokens_per_iter = d.grad_accum * info.world_size * d.batch_size * d.seq_len
    print0(f"tokens per iteration will be: {tokens_per_iter:,}")
    print0(f"breaks down as: {d.grad_accum} grad accum steps * {info.world_size} processes * "
           f"{d.batch_size} batch size * {d.seq_len} max seq len")

    # ---- the run directory and the resume point: rank 0 claims the dir and sets corrupt checkpoints aside,
    # then every rank reads the same (newest intact) checkpoint
    if info.is_main:
        prepare_run_dir(run_dir, data_dir, cfg.resume)
    dist_mod.barrier()
    ckpt = ckpt_mod.latest_checkpoint(run_dir) if cfg.resume else None
    state = ckpt_mod.read_state(ckpt) if ckpt else {}
    data_id = data_identity(loader)
    if ckpt:
        saved = state["global_batch"]
        if saved != tokens_per_iter // d.seq_len or state["seq_len"] != d.seq_len:
            need = saved // (info.world_size * d.batch_size) if saved % (info.world_size * d.batch_size) == 0 else None
            hint = f"--data.grad_accum={need}" if need else "a batch size/accumulation that multiply to it"
            raise UserError(f"{ckpt} was trained with a global batch of {saved} sequences of {state['seq_len']} "
                            f"tokens; now it is {tokens_per_iter // d.seq_len} of {d.seq_len}. Keep the global batch "
                            f"to resume exactly (e.g. {hint})")
        check_resume_model(ckpt, mcfg)
        check_resume_data(ckpt, state.get("data"), data_id, data_dir)

    # ---- model: same init on every rank (DDP also broadcasts rank 0's), then placement and wrapping
    seed_everything(cfg.seed)
    model = Z2all(mcfg, cfg.model.ops)
    if ckpt:
        model.load_state_dict(load_model(ckpt).state_dict())
    model.to(device)
    amp_dtype = pick_dtype(cfg.dtype, device)
    if cfg.train.activation_checkpointing:
        dist_mod.apply_activation_checkpointing(model)
    if cfg.train.compile:
        dist_mod.apply_compile(model)
    wrapped = dist_mod.wrap_model(model, info, cfg.dist, amp_dtype)
    fsdp = dist_mod.is_fsdp(wrapped)
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
               f"{state['grad_accum']} accumulation; now {info.world_size} x {d.grad_accum})")
    elif info.rank:
        seed_everything(cfg.seed + 1000003 * info.rank)  # dropout differs per rank; rank 0 keeps the init stream

    n_params = model.num_params()
    flops_tok = model.flops_per_token(d.seq_len)
    peak = device_peak_flops(device, cfg.metrics.peak_tflops)
    print0(f"model: {cfg.model.preset} {n_params / 1e6:.2f}M parameters "
           f"({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
           f"{flops_tok / 1e6:.1f} MFLOP/token, vocab {mcfg.vocab_size}, ops "
           f"{', '.join(f'{k}={v}' for k, v in cfg.model.ops.selected().items())}")
    extras = "".join([", compile" if cfg.train.compile else "",
                      ", activation checkpointing" if cfg.train.activation_checkpointing else ""])
    print0(f"device: {device} x {info.world_size}, autocast {amp_dtype}, strategy "
           f"{'single' if not info.distributed else cfg.dist.strategy}{extras}; "
           f"peak {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")

    writer = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json", model_config=to_dict(mcfg), world_size=info.world_size,
                    data_meta=meta)
        truncate_metrics(run_dir, start)  # a resume redoes the steps after its checkpoint (all of them: none)
        writer = MetricsWriter(run_dir, cfg.metrics.tensorboard)

    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype != torch.float32
                else nullcontext())
    params = [p for p in wrapped.parameters() if p.requires_grad]
    sampler = _Sampler(cfg, mcfg, tok_dir, val_loader, meta.get("eos_id"))

    def evaluate(step: int) -> float | None:
        if val_loader is None:
            return None
        wrapped.eval()
        total, n = torch.zeros((), device=device), 0
        with torch.no_grad(), autocast:
            for x, y in val_loader.eval_batches(cfg.eval.max_batches):
                _, loss = wrapped(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                total += loss.float()
                n += 1
        dist_mod.reshard(wrapped)
        wrapped.train()
        val = float(dist_mod.all_reduce_mean(total / max(n, 1)))
        if info.is_main:
            writer.log({"kind": "val", "step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            print0(f"step {step}: val loss {val:.4f} (ppl {math.exp(min(val, 50)):.1f}) over {n} batches")
            if not fsdp:  # sampling calls the single-device model; FSDP2 shards need every rank
                texts = sampler.sample(model, device, autocast, step)
                if texts:
                    writer.log({"kind": "sample", "step": step, "samples": texts})
        return val

    def save(step: int, val_loss: float | None) -> Path | None:
        t0 = time.perf_counter()
        optim_state = ckpt_mod.full_optimizer_state(wrapped, optimizer, fsdp)
        full = ckpt_mod.full_model_state(wrapped) if fsdp else None  # collective: every rank
        rngs = dist_mod.all_gather_object(ckpt_mod.rng_state())
        path = None
        if info.is_main:
            st = {"next_step": step, "seq_len": d.seq_len, "global_batch": tokens_per_iter // d.seq_len,
                  "world_size": info.world_size, "grad_accum": d.grad_accum, "batch_size": d.batch_size,
                  "seed": cfg.seed, "lr": lr_at(max(step - 1, 0), cfg.optim, cfg.train.max_steps),
                  "val_loss": val_loss, "tokens_seen": step * tokens_per_iter, "data": data_id}
            path = ckpt_mod.save_checkpoint(run_dir, step, model_to_save=model, model_state=full,
                                            optim_state=optim_state, state=st, rng_states=rngs,
                                            config={"config": to_dict(cfg), "model_config": to_dict(mcfg)},
                                            tokenizer_dir=tok_dir, keep_last=cfg.ckpt.keep_last)
            print0(f"saved {path} ({time.perf_counter() - t0:.1f} s)")
        dist_mod.barrier()
        return path

    stop = _StopFlag()
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
            mean_loss = forward_backward(wrapped, loader, it, d.grad_accum, device, autocast)
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
                print0(f"step {done}: non-finite loss {step_loss} / grad norm {grad_norm}: update skipped "
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
                                "elapsed_s": time.perf_counter() - t_start})
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


def _is_legacy_run_dir(path: Path) -> bool:
    """A run dir an older z2all wrote (before owner files): a checkpoint index, or metrics + config."""
    return (path / "checkpoints" / "index.json").is_file() or (
        (path / "metrics.jsonl").is_file() and (path / "config.json").is_file())


def prepare_run_dir(run_dir: Path, data_dir: Path, resume: bool) -> None:
    """Rank 0, before anything is written: claim `run_dir` for `z2all train` (new, empty, or a train run
    dir; never one holding the token files), refuse a fresh start over an earlier run (its metrics and
    checkpoints would be mixed with the new ones), and for --resume set aside corrupt checkpoints newer than
    the newest intact one, saying so."""
    owner = read_owner(run_dir) if run_dir.is_dir() else None
    ours = owner == "train" or (owner is None and run_dir.is_dir() and _is_legacy_run_dir(run_dir))
    ckpts = ckpt_mod.list_checkpoints(run_dir) if ours else []
    if ours and not resume:  # refused before claiming, so not even the owner file is added
        earlier = [x for x, there in (("checkpoints", ckpts), ("metrics.jsonl", (run_dir / "metrics.jsonl").is_file()))
                   if there]
        if earlier:
            raise UserError(f"--out_dir {run_dir} already holds a training run ({', '.join(earlier)}): pass --resume "
                            "to continue it, or choose another --out_dir (nothing was changed)")
    claim_output_dir(run_dir, "train", option="--out_dir", protect=[data_dir], legacy=_is_legacy_run_dir)
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


def data_identity(loader) -> dict:
    """What the training tokens were: dtype, vocabulary, token count and each file's size and head/tail
    hash (no mtime: a copied token dir is the same data)."""
    files = {p.name: {k: v for k, v in fingerprint(p).items() if k != "mtime_ns"} for p in loader.files}
    return {"dtype": loader.meta["dtype"], "vocab_size": int(loader.meta["vocab_size"]),
            "train_tokens": loader.n_tokens, "train_files": files}


def check_resume_data(ckpt: Path, saved: dict | None, now: dict, data_dir: Path) -> None:
    """A resume continues on the tokens the checkpoint was trained on, or not at all (checkpoints of an
    older z2all recorded nothing: not checked)."""
    if not saved or saved == now:
        return
    if saved.get("train_files") != now["train_files"]:
        names = sorted(set(saved.get("train_files", {})) | set(now["train_files"]))
        what = next((n for n in names if saved.get("train_files", {}).get(n) != now["train_files"].get(n)), "?")
        detail = f"{what} differs"
    else:
        detail = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
    then = saved.get("train_tokens")
    raise UserError(f"--resume: --data.dir {data_dir} is not the data {ckpt} was trained on ({detail}; "
                    f"{then if then is None else f'{then:,}'} train tokens then, {now['train_tokens']:,} now); point "
                    "--data.dir at the original token files, or start a new run in another --out_dir")


def forward_backward(model, loader, step: int, grad_accum: int, device: torch.device, autocast) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step: grad_accum micro-batches from `loader.get_batch(step,
    micro)`, each loss divided by grad_accum, gradient sync only on the last (no_sync before). Returns the
    mean micro-batch loss of this process (a 0-dim fp32 tensor, not synchronised)."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = loader.get_batch(step, micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with dist_mod.sync_context(model, micro == grad_accum - 1):
            with autocast:
                _, loss = model(x, y)
            (loss / grad_accum).backward()  # outside autocast: backward runs in the forward's dtypes anyway
        loss_sum += loss.detach().float()
    return loss_sum / grad_accum


class _Sampler:
    """A few sample generations for the log: the given prompts through the tokenizer, or else the first
    tokens of validation sequences. Draws from its own generator seeded by the step, so sampling never
    moves the training RNG (resumed runs stay identical) and the same step samples the same text."""

    def __init__(self, cfg: Config, mcfg: ModelConfig, tok_dir: Path | None, val_loader, eos_id: int | None):
        self.cfg, self.mcfg, self.val_loader = cfg.eval, mcfg, val_loader
        self.seed = cfg.seed
        self.tok = None
        if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        self.eos = eos_id

    def _prompts(self) -> list[list[int]]:
        n = self.cfg.samples
        if self.cfg.prompts and self.tok is not None:
            return [self.tok.encode(p, add_special_tokens=False).ids or [0] for p in self.cfg.prompts[:n]]
        if self.val_loader is None:
            return []
        x, _ = next(iter(self.val_loader.eval_batches(1)))
        return [row[:8].tolist() for row in x[:n]]

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return " ".join(map(str, ids))
        return self.tok.decode(ids, skip_special_tokens=False)

    def sample(self, model, device, autocast, step: int) -> list[str]:
        if self.cfg.samples <= 0:
            return []
        from z2all.model.generate import generate

        prompts = self._prompts()
        if not prompts:
            return []
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=device).manual_seed(self.seed + step)
        with torch.no_grad(), autocast:
            outs = generate(model, prompts, max_new_tokens=self.cfg.sample_tokens, temperature=self.cfg.temperature,
                            top_k=self.cfg.top_k, eos_id=self.eos, generator=gen)
        model.train(was_training)
        texts = []
        for p, o in zip(prompts, outs):
            text = self.decode(list(p) + list(o))
            texts.append(text)
            print0(f"  sample: {json.dumps(text, ensure_ascii=False)[:400]}")
        return texts
