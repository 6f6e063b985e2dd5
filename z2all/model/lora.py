"""LoRA adapters on the named linear layers of a Z2all model: apply, train only them, merge, save them as an
adapter-only checkpoint (plus a reference to the base) or as a PEFT adapter directory.

    from z2all.model.lora import LoraConfig, apply_lora, merge_lora, lora_state_dict
    model = apply_lora(base_model, LoraConfig(rank=8, alpha=16, targets="q,k,v,o"))   # base frozen in place
    ...train...                                     # only lora_A / lora_B have requires_grad
    sd = lora_state_dict(model)                     # {"layers.0.attention.wq.lora_A": ..., ...}
    merged = merge_lora(model)                      # plain Z2all: W + (alpha / rank) B A

A target linear y = x W^T becomes y = x W^T + (alpha / rank) * dropout(x) A^T B^T with A [r, in] initialised
as PEFT does (kaiming-uniform, a=sqrt(5)) and B [out, r] zeros, so the adapted model starts equal to the base.
The wrapped module keeps the base weight under its own name (`...wq.weight`), so base keys never change and
`lora_state_dict` is exactly the adapter tensors. Targets by short name (q k v o gate up down, "attn", "mlp",
"all") or by our / Hugging Face module name (wq, w1, q_proj, gate_proj, ...).

Only linear layers change, so every `z2all.ops` kernel (RMSNorm, RoPE, SwiGLU, attention, fused LM-head
cross-entropy, Triton or reference) runs unchanged under LoRA. `adapters_disabled(model)` runs the frozen
base (the DPO reference without a second copy of the model).

Adapter-only checkpoints (`z2all sft/dpo --lora.rank=N`): model.safetensors holds only the lora_A/lora_B
tensors; state.json's "lora" entry names the base checkpoint (absolute path + fingerprint of its weights)
and the LoRA hyper-parameters. `load_model` of such a directory (llama.py hands it here) loads the base,
checks the fingerprint and returns the merged model, so `z2all generate/chat/export hf` take it as is.

PEFT format (`save_peft_adapter`): adapter_config.json (peft_type LORA, r, lora_alpha, target_modules as
HF names) + adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` etc., which
`peft.PeftModel.from_pretrained(LlamaForCausalLM(<z2all export hf dir>), adapter_dir)` loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from z2all.config import opt
from z2all.utils import UserError

# short name -> (our module suffix, Hugging Face module name)
TARGETS = {"q": ("attention.wq", "q_proj"), "k": ("attention.wk", "k_proj"), "v": ("attention.wv", "v_proj"),
           "o": ("attention.wo", "o_proj"), "gate": ("feed_forward.w1", "gate_proj"),
           "up": ("feed_forward.w3", "up_proj"), "down": ("feed_forward.w2", "down_proj")}
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": tuple(TARGETS)}
_ALIASES = {**{ours.split(".")[1]: k for k, (ours, _) in TARGETS.items()},
            **{hf: k for k, (_, hf) in TARGETS.items()}}
STATE_KEY = "lora"


@dataclass
class LoraConfig:
    rank: int = opt(0, "LoRA rank; 0 = no LoRA (every weight trains). With a rank only the adapters train and "
                    "checkpoints hold only them")
    alpha: float = opt(16.0, "LoRA scale numerator: the update is (alpha / rank) * B A")
    dropout: float = opt(0.0, "dropout on the adapter input (training only)")
    targets: str = opt("q,k,v,o", "comma list of linears to adapt: q k v o gate up down, or attn, mlp, all "
                       "(HF names q_proj ... and ours wq ... work too)")

    def validate(self, prefix: str = "--lora") -> None:
        if self.rank < 0:
            raise UserError(f"{prefix}.rank={self.rank}: must be >= 0 (0 = no LoRA)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"{prefix}.alpha={self.alpha}: must be a finite number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{prefix}.dropout={self.dropout}: must be in [0, 1)")
        target_names(self.targets, prefix)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_names(spec: str, prefix: str = "--lora") -> tuple[str, ...]:
    """The short names (in TARGETS order) a --lora.targets string selects."""
    picked = set()
    for raw in str(spec).replace(" ", "").split(","):
        if not raw:
            continue
        name = _ALIASES.get(raw, raw)
        if name in GROUPS:
            picked.update(GROUPS[name])
        elif name in TARGETS:
            picked.add(name)
        else:
            raise UserError(f"{prefix}.targets: unknown layer {raw!r}; choose from {', '.join(TARGETS)}, "
                            f"{', '.join(GROUPS)} (or q_proj ... / wq ...)")
    if not picked:
        raise UserError(f"{prefix}.targets is empty; name at least one of {', '.join(TARGETS)}")
    return tuple(k for k in TARGETS if k in picked)


class LoraLinear(nn.Module):
    """A frozen nn.Linear (its weight kept under the same name) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init; B = 0 keeps the base's output
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.disabled:
            return y
        return y + nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """(alpha / rank) B A in fp32: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _targets(model: nn.Module, names: tuple[str, ...]):
    suffixes = tuple("." + TARGETS[k][0] for k in names)
    for name, mod in model.named_modules():
        if name.startswith("layers.") and name.endswith(suffixes) and isinstance(mod, (nn.Linear, LoraLinear)):
            yield name, mod


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze every parameter of `model` and wrap its target linears with LoraLinear (in place; returns
    the model). The adapters take the base weight's device and dtype."""
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name, mod in list(_targets(model, target_names(cfg.targets))):
        if isinstance(mod, LoraLinear):
            raise UserError(f"{name} already has a LoRA adapter")
        _set_module(model, name, LoraLinear(mod, cfg.rank, cfg.alpha, cfg.dropout))
        n += 1
    if n == 0:
        raise UserError(f"--lora.targets={cfg.targets}: no such linear layer in the model")
    model.lora_config = cfg
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed as in model.state_dict() (DDP's `module.` prefix dropped)."""
    return {k.removeprefix("module."): v for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B"))}


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base: every adapter contributes nothing inside the block."""
    mods = [m for m in model.modules() if isinstance(m, LoraLinear)]
    old = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, o in zip(mods, old):
            m.disabled = o


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + (alpha / rank) B A, computed in fp32) and put plain
    nn.Linear modules back; in place, returns the model (every parameter trainable again)."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]:
        lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
        w = mod.weight
        lin.weight = nn.Parameter((w.float() + mod.delta().to(w.device)).to(w.dtype))
        _set_module(model, name, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---------------------------------------------------------------- adapter-only checkpoints

def base_reference(base_path: str | os.PathLike, cfg: LoraConfig) -> dict:
    """What an adapter checkpoint records about its base (saved in state.json under "lora")."""
    from z2all.io import fingerprint
    from z2all.model.llama import WEIGHTS_FILE

    p = Path(base_path).resolve()
    fp = fingerprint(p / WEIGHTS_FILE) if (p / WEIGHTS_FILE).is_file() else None
    if fp is not None:
        fp = {k: v for k, v in fp.items() if k != "mtime_ns"}
    return {"base": str(p), "base_weights": fp, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "targets": ",".join(target_names(cfg.targets))}


def read_reference(ckpt: str | os.PathLike) -> dict | None:
    """The "lora" entry of a checkpoint's state.json, or None (a full checkpoint)."""
    f = Path(ckpt) / "state.json"
    if not f.is_file():
        return None
    try:
        ref = json.loads(f.read_text(encoding="utf-8")).get(STATE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return ref if isinstance(ref, dict) and ref.get("rank") else None


def load_base(ref: dict, where: str | os.PathLike, map_location="cpu", ops=None) -> nn.Module:
    """The base model an adapter checkpoint names, checked against its recorded fingerprint."""
    from z2all.io import fingerprint
    from z2all.model.hf_compat import load_checkpoint
    from z2all.model.llama import WEIGHTS_FILE

    base = Path(ref["base"])
    if not base.is_dir():
        raise UserError(f"{where} is a LoRA adapter checkpoint whose base model {base} is gone; restore the base "
                        "checkpoint there (adapters are meaningless without it)")
    want = ref.get("base_weights")
    if want:
        got = {k: v for k, v in fingerprint(base / WEIGHTS_FILE).items() if k != "mtime_ns"}
        if got != want:
            raise UserError(f"{where} is a LoRA adapter trained on {base}, but {base / WEIGHTS_FILE} has changed "
                            "since; the adapters only fit the original base weights")
    model, _, _, _ = load_checkpoint(base, map_location=map_location, ops=ops, option="LoRA base")
    return model


def config_of(ref: dict) -> LoraConfig:
    return LoraConfig(rank=int(ref["rank"]), alpha=float(ref["alpha"]), dropout=float(ref.get("dropout", 0.0)),
                      targets=str(ref["targets"]))


def load_adapter_checkpoint(ckpt: str | os.PathLike, sd: dict[str, torch.Tensor], map_location="cpu", ops=None,
                            merge: bool = True) -> nn.Module:
    """Base + the adapters `sd` (model.safetensors of an adapter checkpoint): merged into a plain model,
    or (merge=False) the LoRA-wrapped model."""
    ref = read_reference(ckpt)
    if ref is None:
        raise UserError(f"{ckpt}/model.safetensors holds only LoRA adapters but its state.json names no base "
                        "model; the checkpoint is incomplete")
    model = load_base(ref, ckpt, map_location, ops)
    apply_lora(model, config_of(ref))
    load_adapters(model, sd, ckpt)
    return merge_lora(model) if merge else model


def load_adapters(model: nn.Module, sd: dict[str, torch.Tensor], where) -> None:
    want = lora_state_dict(model)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise UserError(f"{where}: the adapters do not fit the model (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}); the checkpoint comes from another LoRA setup")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in sd.items():
            if params[k].shape != v.shape:
                raise UserError(f"{where}: adapter {k} has shape {list(v.shape)}, the model wants "
                                f"{list(params[k].shape)}")
            params[k].copy_(v)


# ---------------------------------------------------------------- PEFT adapter directory

def peft_key(key: str) -> str:
    """layers.3.attention.wq.lora_A -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    from z2all.model.hf_compat import ours_to_hf_key

    stem, _, which = key.rpartition(".")
    hf = ours_to_hf_key(stem + ".weight").removesuffix(".weight")
    return f"base_model.model.{hf}.{which}.weight"


def save_peft_adapter(model: nn.Module, out: str | os.PathLike, base_name: str = "",
                      dtype: torch.dtype | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's LoRA format) into the directory `out`
    (which the caller created)."""
    from safetensors.torch import save_file

    from z2all.io import atomic_path, atomic_write_json

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise UserError("the model has no LoRA adapters to save")
    out = Path(out)
    tensors = {peft_key(k): (v.to(dtype) if dtype else v).detach().cpu().contiguous()
               for k, v in lora_state_dict(model).items()}
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
            "target_modules": sorted(TARGETS[k][1] for k in target_names(cfg.targets)),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None}
    atomic_write_json(out / "adapter_config.json", conf)
    return out


# ---------------------------------------------------------------- the hooks a training objective uses

class LoraHooks:
    """Mixin for a train/loop.py Objective (put it first: `class SFT(LoraHooks, Objective)`) that has
    `self.lora` (a LoraConfig) and `self.init_path` (the resolved base checkpoint). With lora.rank > 0:
    `wrap_lora(model)` in build_model, checkpoints hold only the adapters, a resume loads them onto the
    base, and `lora_state()` (merge it into resume_state) names the base for load_model and export."""

    lora: LoraConfig
    init_path: Path

    def wrap_lora(self, model: nn.Module) -> nn.Module:
        if not self.lora.enabled:
            return model
        apply_lora(model, self.lora)
        return model

    def checkpoint_weights(self, model: nn.Module) -> dict | None:
        return lora_state_dict(model) if self.lora.enabled else None

    def load_weights(self, model: nn.Module, ckpt: Path) -> None:
        from z2all.model.llama import WEIGHTS_FILE, load_model, read_safetensors

        if not self.lora.enabled:
            model.load_state_dict(load_model(ckpt).state_dict())
            return
        sd = read_safetensors(Path(ckpt) / WEIGHTS_FILE)
        if not any(k.endswith(".lora_A") for k in sd):
            raise UserError(f"--resume: {ckpt} holds a full model, not LoRA adapters; resume without --lora.rank "
                            "or start a new run in another --out_dir")
        load_adapters(model, sd, ckpt)

    def lora_state(self) -> dict:
        return {STATE_KEY: base_reference(self.init_path, self.lora)} if self.lora.enabled else {}

    def check_lora_resume(self, ckpt: Path, state: dict) -> None:
        saved = state.get(STATE_KEY) or None
        now = self.lora_state().get(STATE_KEY)
        keys = ("rank", "alpha", "targets")
        if (saved is None) != (now is None) or (now and any(saved.get(k) != now[k] for k in keys)):
            was = "no LoRA" if saved is None else " ".join(f"--lora.{k}={saved.get(k)}" for k in keys)
            raise UserError(f"--resume: {ckpt} was trained with {was}; resume with the same LoRA options")


# ---------------------------------------------------------------- `z2all export hf --adapter`

ADAPTER_COMMAND = "export hf"


def export_peft_adapter(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_out=None,
                        dtype: str = "auto", tokenizer_dir=None, config=None) -> tuple[Path | None, Path]:
    """(base export or None, adapter dir): the PEFT adapter of an adapter-only checkpoint at `out_dir`
    (claimed like an export, built in a temp dir and swapped in), with the tokenizer files; with
    `base_out`, the base model as a `z2all export hf` directory there too (what the adapter loads onto)."""
    import shutil

    from z2all.config import save_config
    from z2all.io import OWNER_FILE, atomic_dir, check_replaceable, claimed_output_dir, inside, write_checksums
    from z2all.model.hf_compat import _NOT_TOKENIZER, EXPORT_CONFIG, default_tokenizer_dir, export_hf
    from z2all.model.llama import WEIGHTS_FILE, read_safetensors, resolve_checkpoint
    from z2all.utils import pick_dtype

    ckpt, kind, _ = resolve_checkpoint(ckpt_dir, "--ckpt")
    ref = read_reference(ckpt) if kind == "z2all" else None
    if ref is None:
        raise UserError(f"--adapter: {ckpt} is not a LoRA checkpoint (trained with --lora.rank); export it "
                        "without --adapter")
    out = Path(out_dir)
    if base_out is not None and (inside(base_out, out) or inside(out, base_out)):
        raise UserError(f"--base-out {base_out} and --out {out} must be separate directories (neither inside the "
                        f"other): each is replaced whole")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir(ckpt, kind)
    model = load_base(ref, ckpt)  # before anything is written: a missing or changed base is refused first
    apply_lora(model, config_of(ref))
    load_adapters(model, read_safetensors(ckpt / WEIGHTS_FILE), ckpt)
    # --out is claimed (and checked) before the base is exported: a refused --out leaves no base export behind
    with claimed_output_dir(out, ADAPTER_COMMAND, option="--out", protect=[ckpt_dir, ckpt, tok_dir, ref["base"]]):
        check_replaceable(out)
        base_path = None
        if base_out is not None:
            base_path = export_hf(ref["base"], base_out, dtype, str(tok_dir) if tok_dir.is_dir() else None,
                                  option="--base-out")
        dt = None if dtype == "auto" else pick_dtype(dtype, torch.device("cpu"))
        with atomic_dir(out) as tmp:
            shutil.copy2(out / OWNER_FILE, tmp / OWNER_FILE)
            save_peft_adapter(model, tmp, base_name=str(Path(base_path).resolve()) if base_path else "", dtype=dt)
            if tok_dir.is_dir():
                for f in sorted(tok_dir.iterdir()):
                    if f.is_file() and f.name not in _NOT_TOKENIZER and not f.name.startswith("."):
                        shutil.copy2(f, tmp / f.name)
            save_config(config, tmp / EXPORT_CONFIG, checkpoint=str(ckpt), lora_base=ref["base"],
                        base_export=str(base_path) if base_path else None) if config is not None else None
            write_checksums(tmp)
    return base_path, out
