"""`z2all dpo`: Direct Preference Optimization of a (usually SFT'd) checkpoint on `z2all data prefs` pairs.

    z2all dpo --init runs/sft --data.dir data/prefs --out_dir runs/dpo --dpo.beta=0.1
    z2all dpo --init runs/sft --data.dir data/prefs --out_dir runs/dpo-lora --lora.rank=8 --optim.lr=5e-4
    z2all dpo ... --resume                                   # exact continuation after a kill
    torchrun --standalone --nproc_per_node=8 -m z2all dpo --init ... --data.dir ...

An objective of the shared loop (`train/loop.py`): DDP/FSDP2, accumulation, clipping, NaN skipping, exact
resume, metrics.jsonl/TensorBoard, Ctrl-C saving and checksummed checkpoints come from there.

Loss. For a pair (x, y_w, y_l), with sequence log-probs log pi(y|x) summed over the response tokens (the
data's mask) for the policy pi and the reference pi_ref, let
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)].
- `--dpo.loss=sigmoid` (Rafailov et al. 2023), with `--dpo.label_smoothing` eps (conservative DPO, Mitchell
  2023: the labels are flipped with probability eps; eps = 0 is plain DPO):
      L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      dL/dh = -beta [(1 - eps) sigmoid(-beta h) - eps sigmoid(beta h)]
  so a pair stops pulling once beta h is large (plain DPO keeps pushing h up forever, at a decaying rate).
- `--dpo.loss=ipo` (Azar et al. 2023): L = (h - 1 / (2 beta))^2, dL/dh = 2 (h - 1/(2 beta)): h is
  regressed onto a finite target, so the policy cannot run away from the reference on separable pairs.
Rewards: r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)), r_l likewise; reward accuracy = share of pairs
with r_w > r_l, reward margin = mean(r_w - r_l). These, the loss and the policy's chosen/rejected log-probs
are logged per step ("train" records: dpo_acc, dpo_margin, logp_chosen, logp_rejected, reward_chosen,
reward_rejected, averaged since the last log) and at each evaluation on the val pairs ("sample" records:
val_dpo_acc, ...; the val loss, a mean over every process's val pairs, is the "val" record's val_loss alone,
with no val_ppl: exp of a preference loss is no perplexity).

Reference model (`--dpo.reference`):
- `precomputed`: the starting policy's log-probs of every train and val pair are computed once, before the
  first step, into <out_dir>/reference/ (npy + an identity of the init weights and the data; reused by a
  resume), so training holds one model. The default for full fine-tuning: it saves a model's memory and its
  forward pass per step.
- `live`: a frozen copy of the starting policy runs next to it (twice the weights in memory).
- With `--lora.rank`, `live` costs nothing: the reference is the base with the adapters switched off
  (`lora.adapters_disabled`), no second copy; `auto` picks that. So `auto` = live with LoRA, else
  precomputed.

LoRA (`--lora.rank/alpha/dropout/targets`, model/lora.py): only the adapters train; the optimizer state and
the checkpoints hold only them, with a reference to the base (`z2all export hf` merges, `--adapter` writes
a PEFT directory).

`--resume` continues only the same run: besides the loop's checks (model shape, seed, tokenizer), the pairs per
step, the data, LoRA, `--dpo.beta/loss/label_smoothing` and the --init weights (the reference) must be the
run's; `--dpo.reference` may change (it is how the reference log-probs are obtained, not what they are).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from z2all.config import opt, section
from z2all.eval.intrain import HeldoutEvalOptions
from z2all.io import atomic_path, atomic_write_json, fingerprint
from z2all.model.lora import LoraConfig, LoraHooks, adapters_disabled, trainable_params
from z2all.ops import OpsConfig
from z2all.train import distributed as dist_mod
from z2all.train.distributed import DistConfig
from z2all.train.loop import Objective
from z2all.train.optim import OptimConfig
from z2all.train.pretrain import CkptSection, MetricsSection
from z2all.train.sft import SFTTrain, check_resume_init, run_objective, validate_finetune
from z2all.utils import UserError, print0

COMMAND = "dpo"
LOSSES = ("sigmoid", "ipo")
REFERENCES = ("auto", "precomputed", "live")
REF_DIR = "reference"


@dataclass
class DPOData:
    dir: str = opt("data/prefs", "preference data directory written by `z2all data prefs`")
    batch_size: int = opt(8, "pairs per micro-batch on each process (each pair is two rows)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step on each process")


@dataclass
class DPOSection:
    beta: float = opt(0.1, "DPO beta: the strength of the KL tie to the reference (larger = closer)")
    loss: str = opt("sigmoid", "sigmoid (DPO, with --dpo.label_smoothing = conservative DPO) or ipo",
                    choices=LOSSES)
    label_smoothing: float = opt(0.0, "sigmoid loss: assumed share of flipped labels, in [0, 0.5)")
    reference: str = opt("auto", "reference log-probs: precomputed once to <out_dir>/reference (one model in "
                         "memory), live (a frozen copy; with LoRA the base without adapters, no copy), auto = live "
                         "with LoRA else precomputed", choices=REFERENCES)


@dataclass
class DPOOptim(OptimConfig):
    lr: float = opt(1e-5, "peak learning rate (after warmup); ~5e-7 for models of 1B and up, ~5e-5 with LoRA")
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only")


@dataclass
class DPOTrain(SFTTrain):
    epochs: float = opt(1.0, "passes over the training pairs (used when max_steps is 0)")


@dataclass
class DPOEval(HeldoutEvalOptions):  # + opt-in held-out bpb / continuation scores (--eval.heldout TOKENS_DIR)
    every: int = opt(100, "evaluate on the val pairs every this many steps (and at the end); 0 = at the end")
    max_batches: int = opt(20, "validation micro-batches per evaluation (per process)")


@dataclass
class Config:
    init: str = opt("", "the starting policy: a checkpoint (runs/<run>/checkpoints/step-N), a run directory (its "
                    "latest checkpoint) or a Hugging Face Llama directory")
    tokenizer: str = opt("", "tokenizer directory; default: the one the --init checkpoint carries")
    out_dir: str = opt("runs/dpo", "run directory: config.json, metrics.jsonl, checkpoints/, reference/")
    seed: int = opt(1337, "seed for the pair order and dropout")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir (fresh start if there is none)")
    threads: int = opt(0, "CPU threads for torch ops; 0 = torch's default")
    ops: OpsConfig = section(OpsConfig, "kernel per op (as --model.ops.* of `z2all train`)")
    data: DPOData = section(DPOData, "preference data and batch shape")
    dpo: DPOSection = section(DPOSection, "loss, beta and the reference model")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters (rank 0 = full fine-tuning)")
    optim: DPOOptim = section(DPOOptim, "AdamW and the learning-rate schedule (DPO defaults)")
    train: DPOTrain = section(DPOTrain, "length (epochs or steps), compile, logging")
    eval: DPOEval = section(DPOEval, "validation loss, reward accuracy and margin on the val pairs")
    ckpt: CkptSection = section(CkptSection, "checkpoint interval and retention")
    dist: DistConfig = section(DistConfig, "multi-process strategy (under torchrun)")
    metrics: MetricsSection = section(MetricsSection, "MFU peak and sinks")

    def validate(self) -> None:
        if not self.init:
            raise UserError("give --init: the checkpoint to align (runs/<run>/checkpoints/step-N, a run directory or "
                            "a Hugging Face Llama directory)")
        validate_finetune(self)
        if not (math.isfinite(self.dpo.beta) and self.dpo.beta > 0):
            raise UserError(f"--dpo.beta={self.dpo.beta}: must be a finite number > 0")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            raise UserError(f"--dpo.label_smoothing={self.dpo.label_smoothing}: must be in [0, 0.5)")
        if self.dpo.label_smoothing and self.dpo.loss != "sigmoid":
            raise UserError("--dpo.label_smoothing applies to --dpo.loss=sigmoid only")

    @property
    def reference(self) -> str:
        if self.dpo.reference == "auto":
            return "live" if self.lora.enabled else "precomputed"
        return self.dpo.reference


def run(cfg: Config) -> int:
    return run_objective(cfg, DPO)


# ---------------------------------------------------------------- the math

def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's trained positions of log p(ids[t] | ids[<t]): logits [N, T, V] (position t
    predicts t + 1), ids [N, T], mask [N, T] (True where ids[t] is a response token). -> [N] fp32."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0):
    """(loss per pair, chosen rewards, rejected rewards) from policy (pc, pr) and reference (rc, rr) sequence
    log-probs of the chosen and rejected answers (the module doc has the formulas)."""
    h = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    return loss, beta * (pc - rc).detach(), beta * (pr - rr).detach()


# ---------------------------------------------------------------- pairs -> batches

@dataclass
class DPOBatch:
    x: torch.Tensor        # [2B, T] chosen rows then rejected rows, right-padded
    mask: torch.Tensor     # [2B, T] bool: response tokens
    pairs: np.ndarray      # [B] pair indices in the split
    split: str


class PairBatches:
    """The pairs of a split in a shuffled order per epoch (seed, epoch), as one stream: step s, micro-batch m
    on rank r reads the batch_size pairs of chunk m * world_size + r of step s's pairs, so a micro-batch is
    a pure function of (step, micro) and independent of how processes and accumulation split a step."""

    def __init__(self, data, split: str, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, shuffle: bool = True):
        self.data, self.split = data, split
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.grad_accum, self.shuffle = grad_accum, shuffle
        self.n = len(data)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def pairs_per_step(self) -> int:
        return self.grad_accum * self.world_size * self.batch_size

    def index(self, g: int) -> int:
        epoch, k = divmod(g, self.n)
        if not self.shuffle:
            return k
        order = self._orders.get(epoch)
        if order is None:
            if len(self._orders) > 4:
                self._orders.clear()
            order = self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(order[k])

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, -(-int(round(epochs * self.n)) // self.pairs_per_step))

    def get_batch(self, step: int, micro: int) -> DPOBatch:
        chunk = micro * self.world_size + self.rank
        first = step * self.pairs_per_step + chunk * self.batch_size
        return self.collate([self.index(g) for g in range(first, first + self.batch_size)])

    def collate(self, pairs: list[int]) -> DPOBatch:
        sides = [self.data.side(k, 0) for k in pairs] + [self.data.side(k, 1) for k in pairs]
        T = max(len(ids) for ids, _ in sides)
        x = np.zeros((len(sides), T), dtype=np.int64)
        m = np.zeros((len(sides), T), dtype=bool)
        for i, (ids, mask) in enumerate(sides):
            x[i, :len(ids)] = ids
            m[i, :len(ids)] = mask
        return DPOBatch(torch.from_numpy(x), torch.from_numpy(m), np.asarray(pairs), self.split)

    def eval_batches(self, max_batches: int):
        mine = list(range(self.n))[self.rank::self.world_size]
        for i in range(0, min(len(mine), max_batches * self.batch_size), self.batch_size):
            yield self.collate(mine[i:i + self.batch_size])

    def mean_tokens_per_pair(self) -> float:
        idx = self.data.idx
        return float(idx[:, 1].mean() + idx[:, 3].mean()) if self.n else 0.0


def policy_logps(model, batch: DPOBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs [B] of the model (one forward over the 2B rows)."""
    x, mask = batch.x.to(device, non_blocking=True), batch.mask.to(device, non_blocking=True)
    logits, _ = model(x)
    lp = sequence_logps(logits, x, mask)
    B = len(batch.pairs)
    return lp[:B], lp[B:]


@torch.no_grad()
def reference_logps(model, batch: DPOBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with the model in eval mode (no dropout) and without gradients."""
    was = model.training
    model.eval()
    try:
        return policy_logps(model, batch, device)
    finally:
        model.train(was)


# ---------------------------------------------------------------- the objective

class DPO(LoraHooks, Objective):
    command = COMMAND
    val_ppl = False  # exp of a preference loss is no perplexity

    def __init__(self, cfg: Config, info):
        from z2all.data.prefs import PrefData
        from z2all.model.hf_compat import default_tokenizer_dir
        from z2all.train.sft import check_tokenizer, init_identity, load_init

        self.cfg, self.info, d = cfg, info, cfg.data
        self.lora = cfg.lora
        self.data_dir = Path(d.dir)
        self.train_data = PrefData(self.data_dir, "train")
        if not len(self.train_data):
            raise UserError(f"--data.dir {self.data_dir}: the train split has no pairs")
        self._init_model, self.init_path, kind = load_init(cfg.init, cfg.ops)
        self.model_config = self._init_model.cfg
        tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir(self.init_path, kind)
        self.tokenizer_dir = check_tokenizer(tok_dir, self.data_dir, explicit=bool(cfg.tokenizer))
        self.tokenizer_from = "--tokenizer" if cfg.tokenizer else f"--init {cfg.init}"
        self.init_id = init_identity(self.init_path)
        meta = self.train_data.meta
        if int(meta["vocab_size"]) > self.model_config.vocab_size:
            raise UserError(f"--data.dir {self.data_dir} uses a vocabulary of {meta['vocab_size']} ids but the --init "
                            f"model has {self.model_config.vocab_size}; render the pairs with the model's tokenizer")
        longest = int(max(self.train_data.idx[:, 1].max(), self.train_data.idx[:, 3].max()))
        if longest > self.model_config.max_seq_len:
            raise UserError(f"--data.dir {self.data_dir} has pairs of {longest} tokens, longer than the --init "
                            f"model's max_seq_len={self.model_config.max_seq_len}; re-run `z2all data prefs` with "
                            f"--max-len {self.model_config.max_seq_len}")
        kw = dict(batch_size=d.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                  grad_accum=d.grad_accum)
        self.batches = PairBatches(self.train_data, "train", **kw)
        val = PrefData(self.data_dir, "val")
        self.val = PairBatches(val, "val", **{**kw, "seed": 0}, shuffle=False) if len(val) else None
        self.grad_accum = d.grad_accum
        self.tokens_per_step = int(self.batches.pairs_per_step * self.batches.mean_tokens_per_pair())
        if cfg.train.max_steps <= 0:
            cfg.train.max_steps = self.batches.steps_for_epochs(cfg.train.epochs)
        self.protect = (self.data_dir, self.tokenizer_dir, self.init_path)
        self.data_id = {"files": {p.name: {k: v for k, v in fingerprint(p).items() if k != "mtime_ns"}
                                  for p in sorted(self.data_dir.glob("train.*"))}, "train_pairs": len(self.train_data)}
        self.reference = cfg.reference
        self.ref_model = None
        self.ref_table: dict[str, torch.Tensor] = {}
        self._acc = {True: {}, False: {}}  # training / eval sums of the metrics
        epochs = cfg.train.max_steps * self.batches.pairs_per_step / len(self.train_data)
        print0(f"dpo: {len(self.train_data):,} train pairs, {len(val):,} val; {cfg.train.max_steps} steps of "
               f"{self.batches.pairs_per_step} pairs (~{epochs:.2f} epochs); "
               f"loss {cfg.dpo.loss}, beta {cfg.dpo.beta:g}; reference: {self._ref_words()}")

    def _ref_words(self) -> str:
        if self.reference == "precomputed":
            return f"precomputed once into {Path(self.cfg.out_dir) / REF_DIR} (one model in memory)"
        return "the base without adapters (no copy)" if self.lora.enabled else "a frozen copy of the initial policy"

    # ---- model and reference

    def build_model(self) -> torch.nn.Module:
        from z2all.train.sft import load_init

        model, self._init_model = self._init_model, None
        if model is None:
            model = load_init(str(self.init_path), self.cfg.ops)[0]
        if self.reference == "live" and not self.lora.enabled:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        elif self.reference == "precomputed":
            self.ref_table = self._precomputed(model)
        return self.wrap_lora(model)

    def _ref_identity(self) -> dict:
        from z2all.model.llama import WEIGHTS_FILE

        w = self.init_path / WEIGHTS_FILE
        files = {p.name: {k: v for k, v in fingerprint(p).items() if k != "mtime_ns"}
                 for p in sorted(self.data_dir.iterdir()) if p.is_file() and p.suffix in (".bin", ".mask", ".idx")}
        weights = fingerprint(w)["head_tail_sha256"] if w.is_file() else None
        return {"init": str(self.init_path), "init_weights": weights,
                "data": files, "dtype": self.cfg.dtype, "ops": self.cfg.ops.selected()}

    def _precomputed(self, model) -> dict[str, torch.Tensor]:
        """Reference log-probs of every pair ([n, 2] fp64 per split), computed by rank 0 into
        <out_dir>/reference/ unless an identical computation is already there."""
        ref_dir = Path(self.cfg.out_dir) / REF_DIR
        ident = self._ref_identity()
        splits = {"train": self.batches, **({"val": self.val} if self.val is not None else {})}

        def fresh() -> bool:
            try:
                return (json.loads((ref_dir / "meta.json").read_text(encoding="utf-8")) == ident
                        and all((ref_dir / f"{s}.npy").is_file() for s in splits))
            except (OSError, ValueError):
                return False

        if self.info.is_main and not fresh():
            device = self.info.device
            model.to(device)
            from contextlib import nullcontext

            from z2all.utils import pick_dtype

            amp = pick_dtype(self.cfg.dtype, device)
            autocast = (torch.autocast(device_type=device.type, dtype=amp) if amp != torch.float32 else nullcontext())
            ref_dir.mkdir(parents=True, exist_ok=True)
            (ref_dir / "meta.json").unlink(missing_ok=True)
            for s, b in splits.items():
                table = np.zeros((b.n, 2), dtype=np.float64)
                src = PairBatches(b.data, s, batch_size=b.batch_size, shuffle=False)
                with autocast:
                    for i in range(0, b.n, b.batch_size):
                        batch = src.collate(list(range(i, min(i + b.batch_size, b.n))))
                        c, r = reference_logps(model, batch, device)
                        table[batch.pairs, 0] = c.double().cpu().numpy()
                        table[batch.pairs, 1] = r.double().cpu().numpy()
                with atomic_path(ref_dir / f"{s}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, table)
            atomic_write_json(ref_dir / "meta.json", ident)  # last: it marks the tables complete
            print0(f"dpo: reference log-probs of {sum(b.n for b in splits.values()):,} pairs -> {ref_dir}")
        dist_mod.barrier()
        return {s: torch.from_numpy(np.load(ref_dir / f"{s}.npy")) for s in splits}

    def reference_for(self, model, batch: DPOBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference == "precomputed":
            t = self.ref_table[batch.split][torch.from_numpy(batch.pairs)].to(device=device, dtype=torch.float32)
            return t[:, 0], t[:, 1]
        if self.lora.enabled:
            with adapters_disabled(model):
                return reference_logps(model, batch, device)
        if next(self.ref_model.parameters()).device != device:
            self.ref_model.to(device)
        return reference_logps(self.ref_model, batch, device)

    # ---- the loop's interface

    def micro_batch(self, step: int, micro: int):
        return self.batches.get_batch(step, micro)

    def loss(self, model, batch: DPOBatch, device: torch.device) -> torch.Tensor:
        rc, rr = self.reference_for(model, batch, device)
        pc, pr = policy_logps(model, batch, device)
        d = self.cfg.dpo
        losses, rw, rl = dpo_loss(pc, pr, rc, rr, d.beta, d.loss, d.label_smoothing)
        acc = self._acc[model.training]
        for k, v in (("loss", losses.detach()), ("dpo_acc", (rw > rl).float()), ("dpo_margin", rw - rl),
                     ("reward_chosen", rw), ("reward_rejected", rl), ("logp_chosen", pc.detach()),
                     ("logp_rejected", pr.detach())):
            acc[k] = acc.get(k, 0.0) + float(v.float().sum())
        acc["n"] = acc.get("n", 0) + len(batch.pairs)
        return losses.mean()

    def _take(self, training: bool) -> dict:
        acc, self._acc[training] = self._acc[training], {}
        n = acc.pop("n", 0)
        return {k: v / n for k, v in acc.items()} if n else {}

    def step_metrics(self) -> dict:
        m = self._take(True)
        m.pop("loss", None)  # the loop logs the step loss itself
        return m

    def eval_loss(self, model, batch: DPOBatch, device: torch.device):
        return self.loss(model, batch, device), len(batch.pairs)  # the loss is a mean over pairs

    def eval_batches(self):
        self._acc[False] = {}
        return None if self.val is None else self.val.eval_batches(self.cfg.eval.max_batches)

    def sample(self, model, device, autocast, step: int):
        m = self._take(False)
        # the loop's "val" record carries the val loss, over every process's pairs; this one (rank 0's pairs
        # only under DDP) would be a second, differing number for the same step
        m.pop("loss", None)
        if m:
            print0(f"step {step}: val reward accuracy {m['dpo_acc']:.1%}, margin {m['dpo_margin']:.3f}, "
                   f"logp chosen {m['logp_chosen']:.2f} / rejected {m['logp_rejected']:.2f}")
            return {"val_" + k: v for k, v in m.items()}
        return []

    def flops_per_token(self, model) -> float:
        return model.flops_per_token(self.model_config.max_seq_len)

    def describe(self, model) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.cfg.ops.selected().items())
        lora = (f", LoRA rank {self.lora.rank} on {self.lora.targets}: {trainable_params(model):,} trainable"
                if self.lora.enabled else "")
        return f"{model.num_params() / 1e6:.2f}M parameters from {self.init_path}{lora}, ops {ops}"

    def resume_state(self) -> dict:
        d = self.cfg.data
        return {"global_pairs": self.batches.pairs_per_step, "batch_size": d.batch_size, "data": self.data_id,
                "dpo": {"beta": self.cfg.dpo.beta, "loss": self.cfg.dpo.loss,
                        "label_smoothing": self.cfg.dpo.label_smoothing, "reference": self.reference},
                "init": self.init_id, **self.lora_state()}

    def check_resume(self, ckpt: Path, state: dict) -> None:
        if state.get("global_pairs") != self.batches.pairs_per_step:
            raise UserError(f"--resume: {ckpt} was trained with {state.get('global_pairs')} pairs per step, now "
                            f"{self.batches.pairs_per_step}; keep batch_size x grad_accum x processes to resume "
                            "exactly")
        if state.get("data") not in (None, self.data_id):
            raise UserError(f"--resume: --data.dir {self.data_dir} is not the preference data {ckpt} was trained on; "
                            "point --data.dir at the original files, or start a new run in another --out_dir")
        self.check_lora_resume(ckpt, state)
        # the loss must mean the same in every step of one metrics.jsonl; `reference` (precomputed or live) is
        # how the reference log-probs are obtained, not what they are, so it may change (e.g. to save memory)
        saved = state.get("dpo") or {}
        diff = [k for k in ("beta", "loss", "label_smoothing") if k in saved and saved[k] != getattr(self.cfg.dpo, k)]
        if diff:
            was = " ".join(f"--dpo.{k}={saved[k]}" for k in diff)
            now = " ".join(f"--dpo.{k}={getattr(self.cfg.dpo, k)}" for k in diff)
            raise UserError(f"--resume: {ckpt} was trained with {was}, now {now} (the loss would change meaning "
                            f"mid-run); resume with {was} or start a new run in another --out_dir")
        # the reference is the starting policy: another --init would silently become another reference
        check_resume_init(ckpt, state.get("init"), self.init_id, "the reference model is the --init policy")

    def config_extras(self) -> dict:
        return {"data_meta": {k: v for k, v in self.train_data.meta.items() if k != "stats"},
                "init": str(self.init_path), "reference": self.reference}

