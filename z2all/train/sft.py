"""`z2all sft`: supervised fine-tuning of a pretrained checkpoint on `z2all data chat` conversations.

    z2all sft --init runs/demo/run --data.dir data/chat --out_dir runs/sft --train.epochs=3
    z2all sft --init hf/some-llama --data.dir data/chat --data.packing=pad --optim.lr=2e-5
    z2all sft --init runs/demo/run --data.dir data/chat --out_dir runs/sft --resume     # exact continuation
    torchrun --standalone --nproc_per_node=8 -m z2all sft --init ... --data.dir ...

It is an objective of the shared loop (`train/loop.py`), so it inherits everything pretraining has:
DDP/FSDP2 under torchrun, gradient accumulation, clipping, NaN skipping, exact resume after a kill,
metrics.jsonl + TensorBoard, Ctrl-C/SIGTERM save, checksummed checkpoints, `z2all plot`.

- `--init`: our checkpoint (checkpoints/step-N, or a run directory: its latest) or a Hugging Face Llama
  directory (`z2all export hf` output or any single-file LlamaForCausalLM), through
  `hf_compat.load_checkpoint`. Training runs in fp32 weights (autocast bf16 on GPU).
- Tokenizer: `--tokenizer`, else the one the init checkpoint carries. Its tokenizer.json must be the one the
  chat data was rendered with (meta.json's tokenizer_sha256), else the ids would mean other words. It is
  copied into every checkpoint, with its chat template, so `z2all export hf`, `z2all chat` and `serve` of an
  SFT checkpoint render prompts the way training did.
- Batches (`data/sft_loader.py`): `--data.packing=pack` (default; examples packed into seq_len rows, each
  attending only to itself with RoPE positions restarting at 0) or `pad` (one example per row). Loss only on
  assistant tokens and the <|im_end|> closing each turn (the data's loss mask).
- `--lora.rank=N` (+ `--lora.alpha/dropout/targets`, model/lora.py): only LoRA adapters train; the optimizer
  state and checkpoints hold only them plus a reference to the --init base (`z2all export hf` merges them,
  `--adapter` writes a PEFT adapter directory).
- Length: `--train.epochs` (default 3) or `--train.max_steps` (> 0 wins). The LR warms up linearly over
  `--optim.warmup_steps` and decays by cosine to `--optim.min_lr`. Defaults for fine-tuning: lr 1e-4,
  min_lr 1e-5, warmup 20, weight decay 0 (lower the lr to ~2e-5 for models of 1B and up).
- Evaluation every `--eval.every` steps and at the end: loss on the val split of the chat data, then
  `--eval.samples` held-out prompts (the val conversations up to their first assistant turn) answered
  greedily; printed, and logged in metrics.jsonl as a "sample" record with their exact match against the
  held-out answer and the share that ended with <|im_end|> (`--eval.sample_tokens` new tokens at most).

Run directory (`--out_dir`, claimed for "sft"; never a `z2all train` run dir): config.json, metrics.jsonl,
checkpoints/step-N/ with tokenizer/ (as `z2all train`). `--resume` keeps the data, packing, global batch, seed,
tokenizer and LoRA options of the run, and with LoRA its --init base (the weights, wherever they now lie).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.config import opt, section
from z2all.eval.intrain import HeldoutEvalOptions
from z2all.io import fingerprint
from z2all.model.lora import LoraConfig, LoraHooks, trainable_params
from z2all.ops import OpsConfig
from z2all.train import distributed as dist_mod
from z2all.train.distributed import DistConfig
from z2all.train.loop import Objective, run_dir_lock, train_loop
from z2all.train.optim import OptimConfig, validate_optim
from z2all.train.pretrain import CkptSection, MetricsSection
from z2all.utils import UserError, print0

COMMAND = "sft"
IM_END = "<|im_end|>"


@dataclass
class SFTData:
    dir: str = opt("data/chat", "chat data directory written by `z2all data chat` (train-*/val-* .bin/.mask/.idx, "
                   "meta.json)")
    packing: str = opt("pack", "pack: examples packed into seq_len rows, each attending only to itself; pad: one "
                       "example per row, padded to the longest of its micro-batch", choices=("pack", "pad"))
    batch_size: int = opt(8, "rows per micro-batch on each process")
    seq_len: int = opt(512, "tokens per packed row; longer examples are cut to it")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step on each process")


@dataclass
class SFTOptim(OptimConfig):
    lr: float = opt(1e-4, "peak learning rate (after warmup); ~2e-5 for models of 1B parameters and up")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only")


@dataclass
class SFTTrain:
    """Length, compile and logging of a fine-tuning run; DPOTrain (dpo.py) is this with its own epochs."""
    epochs: float = opt(3.0, "passes over the training conversations (used when max_steps is 0)")
    max_steps: int = opt(0, "optimizer steps; 0 = as many as --train.epochs take")
    time_budget_s: float = opt(0.0, "stop after this many seconds of training (saving a checkpoint); 0 = none")
    compile: bool = opt(False, "torch.compile every block")
    activation_checkpointing: bool = opt(False, "recompute block activations in backward (less memory)")
    log_every: int = opt(10, "print and record train metrics every this many steps")
    max_bad_steps: int = opt(5, "stop after this many NaN/inf steps in a row (each one is skipped)")


@dataclass
class SFTEval(HeldoutEvalOptions):  # + opt-in held-out bpb / continuation scores (--eval.heldout TOKENS_DIR)
    every: int = opt(100, "eval loss and held-out answers every this many steps (and at the end); 0 = at the end")
    max_batches: int = opt(20, "validation micro-batches per evaluation (per process)")
    samples: int = opt(4, "held-out prompts answered greedily at each evaluation (0 = none)")
    sample_tokens: int = opt(64, "new tokens per answer at most")


@dataclass
class Config:
    init: str = opt("", "the pretrained model: a checkpoint (runs/<run>/checkpoints/step-N), a run directory (its "
                    "latest checkpoint) or a Hugging Face Llama directory")
    tokenizer: str = opt("", "tokenizer directory; default: the one the --init checkpoint carries")
    out_dir: str = opt("runs/sft", "run directory: config.json, metrics.jsonl, checkpoints/")
    seed: int = opt(1337, "seed for the data order and dropout")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (fresh start if there is none)")
    threads: int = opt(0, "CPU threads for torch ops; 0 = torch's default")
    ops: OpsConfig = section(OpsConfig, "kernel per op (as --model.ops.* of `z2all train`)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters (rank 0 = full fine-tuning)")
    data: SFTData = section(SFTData, "chat data, packing and batch shape")
    optim: SFTOptim = section(SFTOptim, "AdamW and the learning-rate schedule (fine-tuning defaults)")
    train: SFTTrain = section(SFTTrain, "length (epochs or steps), compile, logging")
    eval: SFTEval = section(SFTEval, "validation loss and greedy answers to held-out prompts")
    ckpt: CkptSection = section(CkptSection, "checkpoint interval and retention")
    dist: DistConfig = section(DistConfig, "multi-process strategy (under torchrun)")
    metrics: MetricsSection = section(MetricsSection, "MFU peak and sinks")

    def validate(self) -> None:
        if not self.init:
            raise UserError("give --init: the pretrained checkpoint to fine-tune (runs/<run>/checkpoints/step-N, a "
                            "run directory or a Hugging Face Llama directory)")
        validate_finetune(self, positive=("data.seq_len",), nonneg=("eval.samples", "eval.sample_tokens"))


def validate_finetune(cfg, positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = ()) -> None:
    """The checks SFT and DPO configs share (each adds its own keys and rules): counts that must be positive
    or >= 0, the length, the run directory, LoRA and the optimizer; a UserError naming the option."""
    for key in ("data.batch_size", "data.grad_accum", "train.log_every", "train.max_bad_steps", "ckpt.keep_last",
                "eval.max_batches", *positive):
        sect, name = key.split(".")
        if getattr(getattr(cfg, sect), name) <= 0:
            raise UserError(f"--{key}={getattr(getattr(cfg, sect), name)}: must be positive")
    for key in ("train.max_steps", "eval.every", "ckpt.every", *nonneg):
        sect, name = key.split(".")
        if getattr(getattr(cfg, sect), name) < 0:
            raise UserError(f"--{key}={getattr(getattr(cfg, sect), name)}: must be >= 0")
    if not (math.isfinite(cfg.train.epochs) and cfg.train.epochs > 0):
        raise UserError(f"--train.epochs={cfg.train.epochs}: must be a number > 0")
    if not (math.isfinite(cfg.train.time_budget_s) and cfg.train.time_budget_s >= 0):
        raise UserError(f"--train.time_budget_s={cfg.train.time_budget_s}: must be a finite number >= 0")
    if not cfg.out_dir:
        raise UserError("--out_dir is empty; give the run directory")
    cfg.lora.validate()
    validate_optim(cfg.optim)


def run_objective(cfg, objective) -> int:
    """Validate `cfg`, then the shared loop with `objective(cfg, info)` (SFT or DPO) under its thread count
    and process group, both restored after."""
    cfg.validate()
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist_mod.init_distributed(cfg.device, cfg.dist.timeout_s)
    finished = False
    try:
        with run_dir_lock(cfg.out_dir, info, objective.command):
            status = train_loop(cfg, info, objective(cfg, info))
        finished = True
        return status
    finally:
        dist_mod.cleanup(finished)
        torch.set_num_threads(old_threads)


def run(cfg: Config) -> int:
    return run_objective(cfg, SFT)


def load_init(init: str, ops=None):
    """(fp32 model, checkpoint directory, kind) of --init: ours or a Hugging Face Llama directory."""
    from z2all.model.hf_compat import load_checkpoint

    model, path, kind, note = load_checkpoint(init, map_location="cpu", ops=ops, option="--init")
    if note:
        print0(note)
    return model.float(), path, kind


class SFT(LoraHooks, Objective):
    """Fine-tuning on chat data: packed or padded batches, loss on assistant tokens, eval loss on the val
    split and greedy answers to held-out prompts. A resume must keep the data, packing and global batch."""

    command = COMMAND

    def __init__(self, cfg: Config, info):
        from z2all.data.sft_loader import SFTBatches
        from z2all.model.hf_compat import default_tokenizer_dir

        self.cfg, d = cfg, cfg.data
        self.lora = cfg.lora
        self.data_dir = Path(d.dir)
        if not (self.data_dir / "meta.json").is_file():
            raise UserError(f"--data.dir {self.data_dir}: no meta.json; give a directory made by `z2all data chat`")
        # loaded once, before the loop seeds anything (loading draws no random numbers)
        self._init_model, self.init_path, kind = load_init(cfg.init, cfg.ops)
        self.model_config = self._init_model.cfg
        tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir(self.init_path, kind)
        self.tokenizer_dir = check_tokenizer(tok_dir, self.data_dir, explicit=bool(cfg.tokenizer))
        self.tokenizer_from = "--tokenizer" if cfg.tokenizer else f"--init {cfg.init}"
        self.init_id = init_identity(self.init_path)
        kw = dict(seq_len=d.seq_len, batch_size=d.batch_size, mode=d.packing, seed=cfg.seed, rank=info.rank,
                  world_size=info.world_size, grad_accum=d.grad_accum)
        self.batches = SFTBatches(self.data_dir, "train", **kw)
        self.meta = meta = self.batches_meta()
        if int(meta["vocab_size"]) > self.model_config.vocab_size:
            raise UserError(f"--data.dir {self.data_dir} uses a vocabulary of {meta['vocab_size']} ids but the "
                            f"--init model has {self.model_config.vocab_size}; render the chat data with the "
                            "model's tokenizer")
        if d.seq_len > self.model_config.max_seq_len:
            raise UserError(f"--data.seq_len={d.seq_len} exceeds the --init model's max_seq_len="
                            f"{self.model_config.max_seq_len}; lower --data.seq_len")
        self.val = (SFTBatches(self.data_dir, "val", **{**kw, "seed": 0}, shuffle=False)
                    if meta.get("val_examples", 0) else None)
        self.grad_accum = d.grad_accum
        self.world_size = info.world_size
        rows_step = self.batches.rows_per_step
        # tokens/s counts real (non-padding) tokens, so packed and padded runs compare directly
        self.tokens_per_step = int(rows_step * self.batches.real_tokens_per_row())
        if cfg.train.max_steps <= 0:
            cfg.train.max_steps = self.batches.steps_for_epochs(cfg.train.epochs)
        self.protect = (self.data_dir, self.tokenizer_dir, self.init_path)
        self.eval_window = d.seq_len  # held-out scores (eval/intrain.py) in windows of the rows trained on
        self.data_id = {"files": {p.name: {k: v for k, v in fingerprint(p).items() if k != "mtime_ns"}
                                  for p in sorted(self.data_dir.glob("train-*.*"))},
                        "train_examples": len(self.batches.examples)}
        self.im_end = special_id(self.tokenizer_dir, IM_END)
        self.decoder = None
        b = self.batches
        print0(f"sft: {len(b.examples):,} train examples ({b.truncated} cut to seq_len, {b.dropped} without a "
               f"trained token dropped), {d.packing}: {len(b.epoch_rows(0)):,} rows per epoch, padding "
               f"{b.padding_share():.1%}; {cfg.train.max_steps} steps of {rows_step} rows "
               f"(~{cfg.train.max_steps * rows_step / len(b.epoch_rows(0)):.2f} epochs)")

    def batches_meta(self) -> dict:
        return json.loads((self.data_dir / "meta.json").read_text(encoding="utf-8"))

    def build_model(self) -> torch.nn.Module:
        model, self._init_model = self._init_model, None
        return self.wrap_lora(model if model is not None else load_init(str(self.init_path), self.cfg.ops)[0])

    def micro_batch(self, step: int, micro: int):
        return self.batches.get_batch(step, micro)

    def loss(self, model, batch, device: torch.device) -> torch.Tensor:
        from z2all.data.sft_loader import sft_loss

        return sft_loss(model, batch, device)

    def eval_loss(self, model, batch, device: torch.device):
        from z2all.data.sft_loader import IGNORE

        # the mean is over the labelled (assistant) targets, which differ per batch, the more so padded;
        # counted on the CPU copy of the targets: no device sync per batch
        return self.loss(model, batch, device), int((batch.y != IGNORE).sum())

    def eval_batches(self):
        return None if self.val is None else self.val.eval_batches(self.cfg.eval.max_batches)

    def sample(self, model, device, autocast, step: int):
        n = self.cfg.eval.samples
        if n <= 0 or self.val is None:
            return []
        prompts, refs = heldout_prompts(self.val, n)
        with autocast:
            outs = answer(model, prompts, self.im_end, self.cfg.eval.sample_tokens)
        dec = self._decode
        recs, hits = [], 0
        for p, r, (o, ended) in zip(prompts, refs, outs):
            a, want = dec(o), dec(r)
            hits += a.strip() == want.strip()
            recs.append({"prompt": dec(p), "answer": a, "reference": want, "ended": ended})
            print0(f"  Q: {json.dumps(dec(p)[-160:], ensure_ascii=False)}\n"
                   f"  A: {json.dumps(a[:200], ensure_ascii=False)}{'' if ended else ' (no <|im_end|>)'}")
        em, end = hits / len(recs), sum(r["ended"] for r in recs) / len(recs)
        print0(f"step {step}: held-out exact match {em:.0%}, ended with <|im_end|> {end:.0%} ({len(recs)} prompts)")
        return {"samples": recs, "exact_match": em, "ended_im_end": end}

    def _decode(self, ids) -> str:
        if self.decoder is None:
            from z2all.tokenizer.hf import read_tokenizer_json

            self.decoder = read_tokenizer_json(self.tokenizer_dir)
        return self.decoder.decode([int(i) for i in ids], skip_special_tokens=False)

    def flops_per_token(self, model) -> float:
        return model.flops_per_token(self.cfg.data.seq_len)

    def describe(self, model) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.cfg.ops.selected().items())
        lora = (f", LoRA rank {self.lora.rank} on {self.lora.targets}: {trainable_params(model):,} trainable"
                if self.lora.enabled else "")
        return (f"{model.num_params() / 1e6:.2f}M parameters from {self.init_path}{lora}, vocab "
                f"{self.model_config.vocab_size}, ops {ops}")

    def resume_state(self) -> dict:
        d = self.cfg.data
        return {"seq_len": d.seq_len, "global_batch": self.batches.rows_per_step, "batch_size": d.batch_size,
                "packing": d.packing, "data": self.data_id, "init": self.init_id, **self.lora_state()}

    def check_resume(self, ckpt: Path, state: dict) -> None:
        d = self.cfg.data
        now = {"seq_len": d.seq_len, "global_batch": self.batches.rows_per_step, "packing": d.packing}
        diff = [f"{k} {state.get(k)} -> {v}" for k, v in now.items() if state.get(k) != v]
        if diff:
            raise UserError(f"--resume: {ckpt} was trained with other batches ({', '.join(diff)}); keep "
                            "--data.seq_len, --data.packing and the global batch (batch_size x grad_accum x "
                            "processes) to resume exactly")
        if state.get("data") not in (None, self.data_id):
            raise UserError(f"--resume: --data.dir {self.data_dir} is not the chat data {ckpt} was trained on; point "
                            "--data.dir at the original files, or start a new run in another --out_dir")
        self.check_lora_resume(ckpt, state)
        if self.lora.enabled:  # the adapters only mean something on their base (a full checkpoint holds it all)
            check_resume_init(ckpt, state.get("init"), self.init_id, "the adapters were trained on that base")

    def config_extras(self) -> dict:
        return {"data_meta": self.meta, "init": str(self.init_path)}


# ---------------------------------------------------------------- --init on resume

def init_identity(init_path: Path) -> dict:
    """What --init was, for a resume to compare: its resolved directory and the size and head/tail hash of
    each weights file in it (no mtime: a copied checkpoint is the same model)."""
    files = sorted(p for p in Path(init_path).iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or (p.suffix == ".bin" and p.name.startswith("pytorch_model"))))
    return {"path": str(init_path),
            "weights": {p.name: {k: v for k, v in fingerprint(p).items() if k != "mtime_ns"} for p in files}}


def check_resume_init(ckpt: Path, saved: dict | None, now: dict, why: str) -> None:
    """A resume starts from the --init the run started from: the same weights (wherever the directory now
    lies), or the same path when the weights cannot be told. Checkpoints that recorded nothing: not checked."""
    if not isinstance(saved, dict) or not saved.get("path"):
        return
    if saved.get("weights") and now["weights"]:
        same = saved["weights"] == now["weights"]
    else:
        same = saved["path"] == now["path"]
    if same:
        return
    was, cur = saved["path"], now["path"]
    detail = f"now --init {cur}" if was != cur else f"--init {cur} now holds other weights"
    raise UserError(f"--resume: {ckpt} was trained from --init {was}; {detail} ({why}). Resume with --init {was} "
                    "as it was, or start a new run in another --out_dir")


# ---------------------------------------------------------------- tokenizer and answers

def special_id(tok_dir: Path, token: str) -> int | None:
    from z2all.tokenizer.hf import read_tokenizer_json

    return read_tokenizer_json(tok_dir).token_to_id(token)


def check_tokenizer(tok_dir: Path, data_dir: Path, explicit: bool) -> Path:
    """The tokenizer directory, checked against the chat data's meta.json (same tokenizer.json)."""
    opt_name = "--tokenizer" if explicit else "--init"
    if not (tok_dir / "tokenizer.json").is_file():
        what = (f"--tokenizer {tok_dir} has no tokenizer.json" if explicit else
                f"--init carries no tokenizer ({tok_dir} has no tokenizer.json)")
        raise UserError(f"{what}; pass --tokenizer DIR, the tokenizer the chat data was rendered with")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} not found: --data.dir must be a directory made by `z2all data chat`")
    want = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer_sha256")
    got = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    if want and want != got:
        raise UserError(f"{opt_name}: the tokenizer in {tok_dir} is not the one {data_dir} was rendered with "
                        f"(tokenizer.json differs); pass --tokenizer with the right one or re-run `z2all data chat`")
    return tok_dir.resolve()


def heldout_prompts(val, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """The first n val examples up to their first trained token (the prompt, ending with the template's
    assistant header) and the reference answer (the first run of trained tokens, <|im_end|> excluded)."""
    prompts, refs = [], []
    for ids, mask in val.examples[:n]:
        first = int(mask.argmax())
        end = first
        while end < len(mask) and mask[end]:
            end += 1
        prompts.append(ids[:first].tolist())
        refs.append(ids[first:end - 1].tolist())  # the closing <|im_end|> is trained but not part of the answer
    return prompts, refs


@torch.no_grad()
def answer_records(ckpt, records: list[dict], tokenizer=None, max_new_tokens: int = 48) -> list[tuple[str, bool]]:
    """(greedy answer text, ended with <|im_end|>) of the model in `ckpt` (ours, a run directory or a Hugging
    Face Llama directory) for each record's conversation up to its answer, rendered by the tokenizer's chat
    template exactly as `z2all data chat` renders training; `tokenizer` defaults to the checkpoint's. Special
    tokens an answer contains stay in its text (an answer holding <|im_start|> is not an exact match). Used
    by `z2all demo --chat` and `z2all bench finetune`."""
    from z2all.data.chat import Renderer
    from z2all.model.hf_compat import default_tokenizer_dir, load_checkpoint

    model, path, kind, _ = load_checkpoint(ckpt, option="--ckpt")
    model = model.float().eval()
    r = Renderer(tokenizer or default_tokenizer_dir(path, kind))
    prompts = []
    for rec in records:
        ids, mask = r.render([rec["messages"]])[0]
        prompts.append(ids[:mask.index(1)])  # up to and with the assistant header
    with torch.no_grad():
        outs = answer(model, prompts, r.specials.get("<|im_end|>"), max_new_tokens)
    return [(r.tok.decode(list(o), skip_special_tokens=False), ended) for o, ended in outs]


def answer(model, prompts: list[list[int]], eos_id: int | None, max_new_tokens: int, batch: int = 16):
    """Greedy answers: [(new ids without the EOS, ended at eos_id)] per prompt."""
    from z2all.model.generate import generate

    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        new = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos_id)
        # generate stops a row at eos_id (dropped); a row that ran the full length did not end
        out += [(o, len(o) < max_new_tokens) for o in new]
    return out
