"""The Z2all model: the Llama-2 architecture (pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU FFN,
untied or tied LM head), written as single-device code. Parallelism (FSDP2, activation checkpointing),
compilation and kernel choice are applied from outside: the trainer wraps each of `model.layers`, and every
op the model computes (RMSNorm, RoPE, SwiGLU, attention, LM-head cross-entropy) goes through the
`z2all.ops` switch (`model.ops.*`), so `set_ops` swaps the PyTorch references for Triton kernels.

    from z2all.model.config import model_preset
    from z2all.model.llama import Z2all, save_model, load_model
    model = Z2all(model_preset("tiny", vocab_size=8192))
    _, loss = model(idx, targets)                 # idx, targets [B, T]; targets -100 = ignored
    logits, _ = model(idx)                        # [B, T, V] in the model's dtype
    save_model(model, "ckpt/"); model = load_model("ckpt/")

RoPE layout: rotate-half (the two halves of each head are the real and imaginary parts), which is the
Hugging Face Llama layout, so weights map 1:1 to/from `LlamaForCausalLM` with no q/k permutation (Meta's
original checkpoints use the interleaved layout; HF's converter permutes them once, we never need to).

Parameter names: tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1 (gate),
w2 (down), w3 (up)}, layers.{i}.{attention_norm, ffn_norm}, norm, output (see hf_compat.py for the map).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from z2all.config import from_dict, save_config
from z2all.io import atomic_path, verify_checksums
from z2all.model.config import ModelConfig
from z2all.ops import Ops, OpsConfig, resolve
from z2all.ops.reference import rope_cache
from z2all.utils import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


class KVCache:
    """Preallocated keys and values of every layer, each [B, K, max_len, D], so decoding never reallocates
    (Hugging Face's default DynamicCache concatenates, copying the whole cache every step).

    `update(layer, start_pos, k, v)` writes k, v [B, K, T, D] at positions start_pos..start_pos+T-1 and
    returns views of the cache up to there: [B, K, start_pos + T, D]. Rows of a batch share the cache
    index (prompts are left-padded; padding keys are masked with key_padding_mask)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, ops: Ops):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.ops = ops

    def forward(self, x, cos, sin, kv_cache: KVCache | None, start_pos: int, key_padding_mask, segment_ids=None):
        B, T, _ = x.shape
        # [B, T, H*D] -> [B, H, T, D]; the transpose is a view, the ops accept strided inputs
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.ops.rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)  # [B, K, start_pos + T, D]
        # GQA: k, v keep K heads; the op maps query head h to kv head h // (H / K) (no repeat here).
        # One new token (decoding) sees every cached key, so its causal mask is all-true: causal=False
        # lets the op skip building a [T, S] mask every step.
        if segment_ids is None:
            y = self.ops.attention(q, k, v, causal=T > 1, key_padding_mask=key_padding_mask)
        else:  # packed rows: each example attends only to itself (the op's segment_ids path)
            y = self.ops.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, segment_ids=segment_ids)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). The unit the trainer wraps (FSDP2 / checkpointing)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, ops: Ops):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.attention = Attention(cfg, layer_id, ops)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.feed_forward = FeedForward(cfg, ops)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, key_padding_mask=None,
                segment_ids=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos,
                                            key_padding_mask, segment_ids))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Z2all(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: OpsConfig | Ops | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ops = ops if isinstance(ops, Ops) else resolve(ops)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg, i, self.ops) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.ops)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # cos/sin tables [n, D/2] fp32 per device. Deliberately not buffers: `model.to(bf16)` would round
        # them, and a model built on the meta device (FSDP init) would hold garbage after to_empty().
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.tok_embeddings.weight.is_meta:  # on meta there is nothing to fill (and normal_ costs
            self.init_weights()                     # ~50 ms a call there in torch 2.13: 6 s for the 1.7b)

    # ------------------------------------------------------------------ set-up

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for embeddings and projections; the projections that write into the
        residual stream (wo, w2) get init_std / sqrt(2 * n_layers) so the stream's variance does not grow
        with depth (GPT-2's scaled init); RMSNorm weights 1. Public so an FSDP trainer that built the
        model on the meta device can initialise after `to_empty()`."""
        std = self.cfg.init_std
        res_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if self.cfg.tie_embeddings and m is self.output:
                    continue  # shares the embedding's weight, initialised once
                nn.init.normal_(m.weight, 0.0, res_std if name.endswith(("wo", "w2")) else std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def set_ops(self, ops: OpsConfig | Ops | None) -> None:
        """Switch op implementations (e.g. to Triton) on an existing model; weights are untouched."""
        self.ops = ops if isinstance(ops, Ops) else resolve(ops)
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, FeedForward)):
                m.ops = self.ops

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty cache for `batch_size` rows and up to `max_len` positions (prompt + new tokens)."""
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       device=device or p.device, dtype=dtype or p.dtype)

    def kv_cache_bytes(self, batch_size: int, max_len: int, dtype=None) -> int:
        """What new_kv_cache(batch_size, max_len) allocates: keys and values of every layer."""
        c = self.cfg
        size = torch.empty((), dtype=dtype or self.tok_embeddings.weight.dtype).element_size()
        return 2 * c.n_layers * batch_size * c.n_kv_heads * max_len * c.head_dim * size

    # ------------------------------------------------------------------ accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once). exclude_embeddings drops the token embedding
        table and the LM head (Kaplan et al.'s non-embedding N)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context seq_len: 6N + 12·L·H·Q·T (PaLM's
        appendix B), where N = num_params(exclude_embeddings=True) + V·C, i.e. every weight that does a
        matmul: the blocks, the final norm and the LM head (counted even when tied), but not the embedding
        lookup. 12·L·H·Q·T is attention's QK^T and PV with H heads of size Q, counted over the full T×T
        square (the convention MFU numbers are quoted with, though causal kernels skip half)."""
        c = self.cfg
        n = self.num_params(exclude_embeddings=True) + c.vocab_size * c.dim
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    # ------------------------------------------------------------------ forward

    def _rope_table(self, device: torch.device, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._rope.get(device)
        if table is None or table[0].shape[0] < length:
            n = max(length, self.cfg.max_seq_len)
            table = rope_cache(n, self.cfg.head_dim, self.cfg.rope_theta, device=device)
            self._rope[device] = table
        return table

    def rope_for(self, T: int, start_pos: int, key_padding_mask: torch.Tensor | None, device):
        """cos/sin for the T new positions: [T, D/2] when every row is at start_pos.., or [B, T, D/2] with
        left padding, where row b's position of key s is (number of real keys before s) so a padded
        prompt sees exactly the positions it would see alone (as HF's position_ids = cumsum(mask) - 1)."""
        if key_padding_mask is None:
            cos, sin = self._rope_table(device, start_pos + T)
            return cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
        pos = (key_padding_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start_pos:start_pos + T]  # [B, T]
        cos, sin = self._rope_table(device, start_pos + T)
        return cos[pos], sin[pos]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, kv_cache: KVCache | None = None,
                start_pos: int = 0, key_padding_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None):
        """idx [B, T] token ids.

        targets [B, T] (ignore_index -100): returns (None, mean loss), computed by ops.cross_entropy
        on the final hidden states [B*T, C] and the LM head weight, so a fused backend never holds the
        [B*T, V] logits. Without targets: returns (logits [B, T, V] in the model's dtype, None), only the
        last `logits_to_keep` positions when that is > 0 (generation wants 1).

        kv_cache / start_pos: the T tokens sit at positions start_pos.. of the cache (decoding).
        key_padding_mask [B, start_pos + T] bool, True = a real token: left padding for batched prompts of
        different lengths; it also sets each row's RoPE positions (see rope_for).

        Packed training rows (no cache): positions [B, T] (long) are each token's RoPE position, restarting
        at 0 for every example; segment_ids [B, T] (int32) say which example each token belongs to, and
        attention never crosses from one to another (ops.attention's segment_ids)."""
        B, T = idx.shape
        if key_padding_mask is not None and key_padding_mask.shape != (B, start_pos + T):
            raise ValueError(f"key_padding_mask must be [B, start_pos + T] = [{B}, {start_pos + T}], "
                             f"got {list(key_padding_mask.shape)}")
        if positions is not None:
            cos, sin = self._rope_table(idx.device, int(positions.max()) + 1)
            cos, sin = cos[positions], sin[positions]  # [B, T, D/2]
        else:
            cos, sin = self.rope_for(T, start_pos, key_padding_mask, idx.device)
        x = self.dropout(self.tok_embeddings(idx))
        for layer in self.layers:
            if segment_ids is None:
                x = layer(x, cos, sin, kv_cache, start_pos, key_padding_mask)
            else:
                x = layer(x, cos, sin, kv_cache, start_pos, key_padding_mask, segment_ids)
        x = self.norm(x)
        if targets is not None:
            loss = self.ops.cross_entropy(x.reshape(B * T, -1), self.output.weight, targets.reshape(-1))
            return None, loss
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.output(x), None


# ---------------------------------------------------------------------- checkpoints

FP16_MAX = 65504.0  # the largest finite float16


def check_fp16_range(tensors, option: str = "--dtype") -> None:
    """Refuse, in one line naming the tensor, weights that float16 cannot hold: a cast would turn them into
    inf and the export would still look fine (found with a model trained at lr 1e30). bf16 has fp32's range."""
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        m = float(t.detach().abs().max())
        if not m <= FP16_MAX:  # nan too
            raise UserError(f"{option} fp16: {name} holds values up to {m:.3g}, beyond float16's range "
                            f"({FP16_MAX:g}); they would become inf. Export with bf16 or fp32 (nothing was written)")


def save_model(model: Z2all, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write <path>/model.safetensors and <path>/model_config.json, each through a temp file + rename
    (z2all.io), so a crash never leaves a half-written file under the final name. A tied LM head is stored once (as
    tok_embeddings.weight). `state_dict` overrides model.state_dict() (e.g. a full state dict gathered
    from FSDP; DTensors are gathered with full_tensor()). Returns the directory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for k, v in sd.items():
        if model.cfg.tie_embeddings and k == "output.weight":
            continue
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        tensors[k] = v.detach().to("cpu").contiguous()
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    save_config(model.cfg, path / CONFIG_FILE, format="z2all-model", dtype=dtype,
                num_params=model.num_params(), num_params_non_embedding=model.num_params(exclude_embeddings=True))
    return path


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{file} not found: --ckpt must be a directory written by save_model (a training "
                        f"checkpoint step-N/ or an export)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, data["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{file} is not a valid model config ({type(e).__name__}: {e}); the checkpoint is "
                        f"damaged, use another one") from None
    cfg.validate()
    return cfg


def read_safetensors(file: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or unreadable file is a UserError naming it (with or
    without checksums: safetensors checks that the header covers the file exactly)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=device)
    except OSError:
        raise
    except Exception as e:  # safetensors_rust.SafetensorError and friends: the library has no public base
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{file} is corrupt or truncated ({msg}); use another checkpoint or save it again") from None


def load_model(path: str | os.PathLike, map_location="cpu", ops: OpsConfig | Ops | None = None) -> Z2all:
    """The model save_model wrote, with its saved dtype, on `map_location`. Built on the meta device and
    filled by assignment, so loading does not pay for a random init. The weights and config are checked
    against the directory's checksums.json when it has one (training checkpoints do)."""
    path = Path(path)
    cfg = load_model_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} not found next to {CONFIG_FILE}")
    verify_checksums(path, only=[WEIGHTS_FILE, CONFIG_FILE])
    sd = read_safetensors(weights, str(torch.device(map_location)))
    if any(k.endswith(".lora_A") for k in sd):  # an adapter-only checkpoint (z2all sft/dpo --lora.rank)
        from z2all.model.lora import load_adapter_checkpoint

        return load_adapter_checkpoint(path, sd, map_location, ops)
    return model_from_state_dict(cfg, sd, ops, source=weights)


def _step_number(p: Path) -> int:
    try:
        return int(p.name.removeprefix("step-"))
    except ValueError:
        return -1


def _latest_in_run(ckpts: Path) -> Path | None:
    """The checkpoint checkpoints/index.json names as latest, else the highest step-N holding a model."""
    try:
        latest = json.loads((ckpts / "index.json").read_text(encoding="utf-8")).get("latest")
        if latest and (ckpts / latest / CONFIG_FILE).is_file():
            return ckpts / latest
    except (OSError, ValueError, AttributeError):
        pass  # no or damaged index: look at the directories themselves
    found = [p for p in ckpts.glob("step-*") if (p / CONFIG_FILE).is_file() and _step_number(p) >= 0]
    return max(found, key=_step_number) if found else None


def resolve_checkpoint(path: str | os.PathLike, option: str = "--ckpt") -> tuple[Path, str, str | None]:
    """What a user may pass as a checkpoint -> (model directory, kind, note). kind "z2all": a save_model
    directory (model_config.json + model.safetensors, e.g. runs/x/checkpoints/step-N); "hf": a Hugging
    Face Llama directory (config.json + model.safetensors, e.g. a `z2all export hf` output). A run
    directory (or its checkpoints/) resolves to its latest checkpoint; `note` then says which, for the
    caller to print. Anything else is a UserError saying what the path is and what is expected."""
    if not str(path):
        raise UserError(f"give {option}: a checkpoint directory (runs/<run>/checkpoints/step-N), a run directory "
                        f"or a `z2all export hf` directory")
    p = Path(path)
    expected = ("expected a checkpoint directory (model_config.json + model.safetensors, e.g. "
                "runs/<run>/checkpoints/step-N), a training run directory or a `z2all export hf` directory")
    if not p.exists():
        raise UserError(f"{option} {p}: no such directory; {expected}")
    if not p.is_dir():
        hint = f"; did you mean {option} {p.parent}?" if p.name in (WEIGHTS_FILE, CONFIG_FILE, "config.json") else ""
        raise UserError(f"{option} {p} is a file, not a directory{hint or '; ' + expected}")
    if (p / CONFIG_FILE).is_file():
        return p, "z2all", None
    if (p / WEIGHTS_FILE).is_file() and ((p / "state.json").is_file() or (p / "optimizer.pt").is_file()):
        # our checkpoint's config.json is the run's config, not a Hugging Face one: say what is missing
        raise UserError(f"{option} {p} is a training checkpoint without its {CONFIG_FILE}; the checkpoint is "
                        f"incomplete: use another checkpoints/step-N (or the run directory)")
    if (p / "config.json").is_file() and (p / WEIGHTS_FILE).is_file():
        return p, "hf", None
    for ckpts in (p / "checkpoints", p):
        if ckpts.is_dir() and ((ckpts / "index.json").is_file() or any(ckpts.glob("step-*"))):
            latest = _latest_in_run(ckpts)
            if latest is None:
                raise UserError(f"{option} {p} is a training run without a complete checkpoint yet; wait for "
                                f"the first save (--ckpt.every) or pass a checkpoints/step-N directory")
            return latest, "z2all", f"{option} {p}: using its latest checkpoint {latest}"
    if (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file():
        raise UserError(f"{option} {p} is a training run without a checkpoint yet; wait for the first save "
                        f"(--ckpt.every) or pass a checkpoints/step-N directory")
    if (p / "config.json").is_file() and (p / "model.safetensors.index.json").is_file():
        raise UserError(f"{option} {p} is a sharded Hugging Face model; only single-file model.safetensors "
                        f"directories (as `z2all export hf` writes) load")
    if (p / WEIGHTS_FILE).is_file():
        raise UserError(f"{option} {p} has {WEIGHTS_FILE} but neither {CONFIG_FILE} nor config.json; the "
                        f"checkpoint is incomplete")
    shown = sorted(e.name for e in p.iterdir())[:4]
    what = f"it holds {', '.join(shown)}{', ...' if len(shown) == 4 else ''}" if shown else "it is empty"
    raise UserError(f"{option} {p} is not a checkpoint ({what}); {expected}")


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], ops: OpsConfig | Ops | None = None,
                          source: str | os.PathLike | None = None) -> Z2all:
    """A Z2all holding exactly these tensors (no copy, no random init): built on the meta device and filled
    by assignment. With tied embeddings `output.weight` may be absent; it is shared with the embedding.
    `source` (the weights file) turns missing, extra or mis-shaped tensors into a UserError naming it."""
    if cfg.tie_embeddings and "tok_embeddings.weight" in sd:
        sd = {**sd, "output.weight": sd["tok_embeddings.weight"]}
    with torch.device("meta"):
        model = Z2all(cfg, ops)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        if source is None:
            raise
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{source} does not fit its model config ({detail}); the checkpoint is damaged or its "
                        f"files come from different models") from None
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True made two Parameters; share one
    return model
