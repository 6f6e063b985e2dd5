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

The loop itself (setup, resume, accumulation, clipping, NaN skipping, evaluation, checkpoints, signals,
metrics) is `z2all.train.loop.train_loop`; pretraining is its `Pretraining` objective: micro-batches from
the token files, cross-entropy, validation on the val split, sample generations, and (with
`--eval.bpb_max_tokens` / `--eval.tasks_max_items`) bits per byte and "which continuation?" accuracy per domain
on the held-out documents of the token files (z2all/eval/intrain.py). Per step: forward/backward
under bf16 autocast on GPU (fp32 on CPU), gradient all-reduce on the last micro-batch only, clip, AdamW with
the warmup+cosine LR. A NaN/inf loss or gradient norm skips the update (counted); `train.max_bad_steps` in a
row stop the run with the last good checkpoint untouched. Ctrl-C (SIGINT), SIGTERM or the time budget
finish the current step, save a checkpoint and exit (status 130 after a signal).

Model section: `model.preset` names a `z2all.model.config` preset and every other `model.<field>` that
is set overrides it (`--model.n_layers=2`); `model.vocab_size` defaults to the token files' vocabulary
(meta.json). `model.ops.*` picks the kernels (`--model.ops.preset=use_all`, `--model.ops.attention=triton`).

Outputs in `out_dir`: config.json (resolved), metrics.jsonl (+ tensorboard/), checkpoints/step-N/ (see
checkpoint.py), and train.log lines on the console (rank 0).

What is refused, each with one line naming the file or option: an `out_dir` that holds anything but a
`z2all train` run (or holds the token files); a fresh start into a dir with an earlier run's metrics or
checkpoints (pass --resume, or choose another dir); token files that do not match meta.json; a resume
whose model shape, global batch, training tokens, seed or tokenizer (its tokenizer.json's sha256, recorded
in each checkpoint's state) differ from its checkpoint's; option values the loop
cannot use (NaN learning rate, ...). `--resume` skips a corrupt latest checkpoint for the newest intact
one and says so (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.config import opt, section
from z2all.eval.intrain import HeldoutEvalOptions
from z2all.io import fingerprint
from z2all.model.config import ModelConfig, model_preset
from z2all.ops import OpsConfig
from z2all.train import distributed as dist_mod
from z2all.train.distributed import DistConfig
from z2all.train.loop import Objective, TrainingDiverged, accumulate, run_dir_lock, train_loop  # noqa: F401 - re-exported
from z2all.train.optim import OptimConfig, validate_optim
from z2all.utils import UserError, print0


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
class EvalSection(HeldoutEvalOptions):
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
    eval: EvalSection = section(EvalSection, "validation loss, sample generations and (opt-in) bits per byte and "
                                "continuation accuracy per held-out domain")
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


def run(cfg: Config) -> int:
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist_mod.init_distributed(cfg.device, cfg.dist.timeout_s)
    finished = False
    try:
        with run_dir_lock(cfg.out_dir, info, "train"):
            status = train_loop(cfg, info, Pretraining(cfg, info))
        finished = True
        return status
    finally:
        dist_mod.cleanup(finished)
        torch.set_num_threads(old_threads)


class Pretraining(Objective):
    """Next-token prediction on the token files: micro-batches from the TokenLoader (a pure function of the
    step, so a resume just asks for the next step), cross-entropy loss, validation on the val split, sample
    generations. A resume must keep the global batch, the sequence length and the training tokens."""

    def __init__(self, cfg: Config, info):
        from z2all.data.loader import TokenLoader

        self.cfg, d = cfg, cfg.data
        self.data_dir = Path(d.dir)
        kw = dict(batch_size=d.batch_size, seq_len=d.seq_len, seed=cfg.seed, rank=info.rank,
                  world_size=info.world_size, grad_accum=d.grad_accum)
        self.loader = TokenLoader(self.data_dir, "train", **kw)  # checks meta.json and the token files against it
        self.meta = meta = self.loader.meta
        self.val_loader = TokenLoader(self.data_dir, "val", **kw) if meta.get("val_tokens", 0) > d.seq_len else None
        if self.val_loader is None:  # said, not silent: no val loss means no best checkpoint either
            print0(f"note: the val split of {self.data_dir} has {meta.get('val_tokens', 0):,} tokens, under one window "
                   f"of --data.seq_len {d.seq_len} + 1: no validation loss and no best checkpoint in this run "
                   f"(tokenize with a larger --val-fraction for them)")
        self.tokenizer_dir = tokenizer_dir_of(self.data_dir, meta)
        self.tokenizer_from = f"meta.json of --data.dir {self.data_dir}"
        self.model_config = resolve_model_config(cfg.model, int(meta["vocab_size"]), d.seq_len)
        self.grad_accum = d.grad_accum
        self.world_size = info.world_size
        self.tokens_per_step = d.grad_accum * info.world_size * d.batch_size * d.seq_len
        self.protect = (self.data_dir, self.tokenizer_dir)  # inputs the run dir may not contain
        self.heldout_dir, self.eval_window = self.data_dir, d.seq_len  # the held-out scores (eval/intrain.py)
        self.data_id = data_identity(self.loader)
        self.sampler = _Sampler(cfg, self.model_config, self.tokenizer_dir, self.val_loader, meta.get("eos_id"))
        print0(f"tokens per iteration will be: {self.tokens_per_step:,}")
        print0(f"breaks down as: {d.grad_accum} grad accum steps * {info.world_size} processes * "
               f"{d.batch_size} batch size * {d.seq_len} max seq len")

    def build_model(self) -> torch.nn.Module:
        from z2all.model.llama import Z2all

        return Z2all(self.model_config, self.cfg.model.ops)

    def micro_batch(self, step: int, micro: int):
        return self.loader.get_batch(step, micro)

    def loss(self, model, batch, device: torch.device) -> torch.Tensor:
        x, y = batch
        _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        return loss

    def eval_loss(self, model, batch, device: torch.device):
        # every target counts, so the count is the batch's size (the last val batch may be smaller)
        return self.loss(model, batch, device), batch[1].numel()

    def eval_batches(self):
        return None if self.val_loader is None else self.val_loader.eval_batches(self.cfg.eval.max_batches)

    def sample(self, model, device, autocast, step: int) -> list[str]:
        return self.sampler.sample(model, device, autocast, step)

    def flops_per_token(self, model) -> float:
        return model.flops_per_token(self.cfg.data.seq_len)

    def describe(self, model) -> str:
        cfg = self.cfg
        return (f"{cfg.model.preset} {model.num_params() / 1e6:.2f}M parameters "
                f"({model.num_params(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
                f"{self.flops_per_token(model) / 1e6:.1f} MFLOP/token, vocab {self.model_config.vocab_size}, ops "
                f"{', '.join(f'{k}={v}' for k, v in cfg.model.ops.selected().items())}")

    def resume_state(self) -> dict:
        d = self.cfg.data
        return {"seq_len": d.seq_len, "global_batch": self.tokens_per_step // d.seq_len, "batch_size": d.batch_size,
                "data": self.data_id}

    def check_resume(self, ckpt: Path, state: dict) -> None:
        d = self.cfg.data
        saved = state["global_batch"]
        if saved != self.tokens_per_step // d.seq_len or state["seq_len"] != d.seq_len:
            per = self.world_size * d.batch_size
            need = saved // per if saved % per == 0 else None
            hint = f"--data.grad_accum={need}" if need else "a batch size/accumulation that multiply to it"
            raise UserError(f"{ckpt} was trained with a global batch of {saved} sequences of {state['seq_len']} "
                            f"tokens; now it is {self.tokens_per_step // d.seq_len} of {d.seq_len}. Keep the global "
                            f"batch to resume exactly (e.g. {hint})")
        check_resume_data(ckpt, state.get("data"), self.data_id, self.data_dir)

    def config_extras(self) -> dict:
        return {"data_meta": self.meta}


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
    """The gradient of one pretraining step from `loader.get_batch(step, micro)` (the loop's `accumulate`,
    for callers that hold a loader and a model but no objective, e.g. bench ablation)."""
    class _Batches(Objective):
        def micro_batch(self, step, micro):
            return loader.get_batch(step, micro)

        loss = Pretraining.loss

    obj = _Batches()
    obj.grad_accum = grad_accum
    return accumulate(model, obj, step, device, autocast)


class _Sampler:
    """A few sample generations for the log: the given prompts through the tokenizer, or else the first
    tokens of validation sequences. Draws from its own generator seeded by the step, so sampling never
    moves the training RNG (resumed runs stay identical) and the same step samples the same text."""

    def __init__(self, cfg: Config, mcfg: ModelConfig, tok_dir: Path | None, val_loader, eos_id: int | None):
        self.cfg, self.mcfg, self.val_loader = cfg.eval, mcfg, val_loader
        self.seed = cfg.seed
        self.tok = None
        if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
            from z2all.tokenizer.hf import read_tokenizer_json

            self.tok = read_tokenizer_json(tok_dir)
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
