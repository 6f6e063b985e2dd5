"""Hugging Face interop: our Z2all <-> transformers `LlamaForCausalLM`, with an exact weight mapping, and
the `z2all export hf` command that writes a standard Llama directory (config.json, model.safetensors,
generation_config.json, tokenizer files) loadable with `AutoModelForCausalLM.from_pretrained` and no
remote code.

    z2all export hf --ckpt runs/demo/checkpoints/step-1000 --out exports/demo-hf --dtype bf16

--out is claimed through z2all.io: a new or empty directory, or an earlier export (its .z2all-owner.json);
a directory holding anything else, or holding the checkpoint, is refused and left byte-identical.
`load_checkpoint` reads any of: a save_model directory, a run directory (latest checkpoint), an export.

LoRA checkpoints (`z2all sft/dpo --lora.rank=N`: adapters only + a reference to the base) export merged
(`--merge-lora`, the default: a plain Llama directory), or with `--adapter` as a PEFT adapter directory
(`--base-out DIR` also exports the base it loads onto); see model/lora.py.

Both models use the rotate-half RoPE layout, so q/k projections copy 1:1 (no permutation); the map is:

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.{i}.attention.w{q,k,v,o}        model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.feed_forward.w1 / w3 / w2   model.layers.{i}.mlp.gate_proj / up_proj / down_proj.weight
    layers.{i}.attention_norm / ffn_norm   model.layers.{i}.input_layernorm / post_attention_layernorm.weight
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight  (absent from the file when tied)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.config import opt, save_config
from z2all.io import (
    CHECKSUM_FILE,
    OWNER_FILE,
    atomic_dir,
    atomic_write_text,
    check_replaceable,
    claimed_output_dir,
    verify_checksums,
    write_checksums,
)
from z2all.model.config import ModelConfig
from z2all.model.llama import (
    Z2all,
    check_fp16_range,
    load_model,
    model_from_state_dict,
    read_safetensors,
    resolve_checkpoint,
)
from z2all.utils import UserError, pick_dtype, print0, quiet_progress

# (our regex, HF template) for per-layer tensors
_LAYER_MAP = [
    ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
    ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
    ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
]
_TOP_MAP = [("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight")]


def ours_to_hf_key(key: str) -> str:
    for ours, hf in _TOP_MAP:
        if key == ours:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
    if m:
        for ours, hf in _LAYER_MAP:
            if m.group(2) == ours:
                return f"model.layers.{m.group(1)}.{hf}.weight"
    raise KeyError(f"no Hugging Face name for parameter '{key}'")


def hf_to_ours_key(key: str) -> str:
    for ours, hf in _TOP_MAP:
        if key == hf:
            return ours
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m:
        for ours, hf in _LAYER_MAP:
            if m.group(2) == hf:
                return f"layers.{m.group(1)}.{ours}.weight"
    raise KeyError(f"no Z2all name for Hugging Face parameter '{key}'")


def hf_config(cfg: ModelConfig, **token_ids):
    """The LlamaConfig of the same shape. token_ids: bos_token_id / eos_token_id / pad_token_id (None when
    unknown; LlamaConfig's own defaults 1 and 2 belong to Meta's tokenizer, not ours)."""
    from transformers import LlamaConfig

    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **token_ids}
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False, attention_dropout=0.0, **ids)


def _rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise UserError(f"RoPE scaling '{rope_type}' is not supported; only plain Llama-2 RoPE imports")
    return float(params.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))


def config_from_hf(hf_cfg) -> ModelConfig:
    """Our ModelConfig for a transformers LlamaConfig (errors on features Llama-2 does not have)."""
    if getattr(hf_cfg, "model_type", "llama") != "llama":
        raise UserError(f"only Llama models import, got model_type '{hf_cfg.model_type}'")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise UserError("Llama checkpoints with attention_bias / mlp_bias do not fit the Z2all architecture")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{hf_cfg.hidden_act}' is not SwiGLU's silu")
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        raise UserError(f"head_dim {head_dim} x {hf_cfg.num_attention_heads} heads != hidden_size "
                        f"{hf_cfg.hidden_size}; Z2all needs head_dim = dim / n_heads")
    return ModelConfig(
        dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers, n_heads=hf_cfg.num_attention_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads, vocab_size=hf_cfg.vocab_size,
        ffn_dim=hf_cfg.intermediate_size, norm_eps=hf_cfg.rms_norm_eps, rope_theta=_rope_theta(hf_cfg),
        max_seq_len=hf_cfg.max_position_embeddings, tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=getattr(hf_cfg, "initializer_range", 0.02))


def to_hf(model: Z2all, **token_ids):
    """A transformers LlamaForCausalLM with model's weights (copied), dtype and device."""
    from transformers import LlamaForCausalLM

    p = model.tok_embeddings.weight
    hf = LlamaForCausalLM(hf_config(model.cfg, **token_ids)).to(device=p.device, dtype=p.dtype)
    sd = {ours_to_hf_key(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # a tied lm_head is the embedding itself; anything else missing would be a mapping bug
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def from_hf(hf_model, ops=None) -> Z2all:
    """Our Z2all with the weights (copied) of a transformers LlamaForCausalLM, on the same device/dtype."""
    cfg = config_from_hf(hf_model.config)
    sd = {}
    for k, v in hf_model.state_dict().items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if cfg.tie_embeddings and k == "lm_head.weight":
            continue
        sd[hf_to_ours_key(k)] = v.detach().clone()
    return model_from_state_dict(cfg, sd, ops)


# ---------------------------------------------------------------------- loading any checkpoint

def load_hf_dir(path: str | os.PathLike, map_location="cpu", ops=None) -> Z2all:
    """Our Z2all from a single-file Hugging Face Llama directory (config.json + model.safetensors, what
    `export_hf` writes), read directly (no transformers model, no random init). Checked against its
    checksums.json when present; damage is a UserError naming the file."""
    path = Path(path)
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        from transformers import LlamaConfig

        if raw.get("model_type") != "llama":
            raise UserError(f"{file}: model_type {raw.get('model_type')!r}; only Llama models load")
        cfg = config_from_hf(LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"}))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{file} is not a valid Hugging Face config ({type(e).__name__}: {e})") from None
    verify_checksums(path, only=["model.safetensors", "config.json"])
    weights = path / "model.safetensors"
    sd = {}
    for k, v in read_safetensors(weights, str(torch.device(map_location))).items():
        if k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight"):
            continue
        try:
            sd[hf_to_ours_key(k)] = v
        except KeyError:
            raise UserError(f"{weights}: tensor {k!r} is not part of a Llama model") from None
    return model_from_state_dict(cfg, sd, ops, source=weights)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", ops=None, option: str = "--ckpt"):
    """(model, directory, kind, note) for anything `resolve_checkpoint` accepts: a save_model checkpoint,
    a run directory (its latest checkpoint) or a Hugging Face Llama directory such as our export."""
    directory, kind, note = resolve_checkpoint(path, option)
    model = load_model(directory, map_location, ops) if kind == "z2all" else load_hf_dir(directory, map_location, ops)
    return model, directory, kind, note


def default_tokenizer_dir(directory: Path, kind: str) -> Path:
    """Where a checkpoint keeps its tokenizer: <ckpt>/tokenizer/, or the export directory itself."""
    return directory / TOKENIZER_SUBDIR if kind == "z2all" else directory


# ---------------------------------------------------------------------- export command

TOKENIZER_SUBDIR = "tokenizer"
_NOT_TOKENIZER = {"config.json", "model.safetensors", "generation_config.json", CHECKSUM_FILE, OWNER_FILE,
                  "model_config.json", "z2all_export.json"}
EXPORT_COMMAND = "export hf"
EXPORT_CONFIG = "z2all_export.json"


def _token_ids(tok) -> dict:
    if tok is None:
        return {}
    # We never prepend BOS, but a null bos_token_id makes some runtimes (llama.cpp's converter) pick an
    # arbitrary id (11, a comma in the demo vocabulary); <|endoftext|> (the eos) is the honest "start of text".
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return {"bos_token_id": bos, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
              tokenizer_dir: str | os.PathLike | None = None, config=None, option: str = "--out") -> Path:
    """Write a standard LlamaForCausalLM directory at out_dir from a checkpoint (anything
    `resolve_checkpoint` accepts). Tokenizer files come from tokenizer_dir, else <ckpt>/tokenizer/ when
    present. out_dir must be new, empty or an earlier export (its owner file), and must not contain the
    checkpoint or the tokenizer; it is built in a temp dir and swapped into place (z2all.io.atomic_dir), so
    it is either the old or the complete new export. dtype 'auto' keeps the checkpoint's. Next to the
    files go checksums.json and z2all_export.json (save_config: the resolved `config`, a Config, and what
    was read). `option` names out_dir in messages (--base-out when `export hf --adapter` exports the base)."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    ckpt, kind, note = resolve_checkpoint(ckpt_dir, "--ckpt")
    if note:
        print(note, file=sys.stderr, flush=True)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir(ckpt, kind)
    has_tok = tok_dir.is_dir() and any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if tokenizer_dir and not has_tok:
        what = "holds no tokenizer.json or tokenizer_config.json" if tok_dir.is_dir() else "no such directory"
        raise UserError(f"--tokenizer {tok_dir}: {what}; give a tokenizer directory (from `z2all tokenizer train`)")
    if not has_tok:
        tok_dir = None
    if kind == "z2all" and out.resolve().is_relative_to(ckpt.resolve()):
        raise UserError(f"{option} {out} lies inside the checkpoint {ckpt}; checkpoint retention would delete it "
                        f"with the checkpoint. Choose an {option} outside it")
    if quiet_progress():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars in CI logs
    # claimed before the (slow) model load, so a refusal is immediate; undone if the export fails
    with claimed_output_dir(out, EXPORT_COMMAND, option=option, protect=[ckpt_dir, ckpt, tok_dir]):
        check_replaceable(out, option)  # before the (slow) load: an earlier export that a user added files to
        model = load_model(ckpt) if kind == "z2all" else load_hf_dir(ckpt)
        if dtype == "fp16":
            check_fp16_range(model.state_dict().items())
        if dtype != "auto":
            model = model.to(pick_dtype(dtype, torch.device("cpu")))
        tok = None
        if tok_dir is not None:
            from z2all.model.generate import check_vocab_fits, load_tokenizer

            tok = load_tokenizer(tok_dir, trust_remote_code=False)
            check_vocab_fits(tok, model.cfg.vocab_size, tok_dir, ckpt)
        ids = _token_ids(tok)
        hf = to_hf(model, **ids)
        with atomic_dir(out, option) as tmp:
            shutil.copy2(out / OWNER_FILE, tmp / OWNER_FILE)
            hf.save_pretrained(tmp, safe_serialization=True)
            # transformers 5 writes rope_theta inside rope_parameters only; 4.x reads the top-level key and
            # would silently fall back to 10000, so write both (5.x reads the legacy key too)
            conf = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            conf.setdefault("rope_theta", model.cfg.rope_theta)
            atomic_write_text(tmp / "config.json", json.dumps(conf, indent=2, sort_keys=True) + "\n")
            gen = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
            im_end = tok.convert_tokens_to_ids("<|im_end|>") if tok is not None else None
            if isinstance(im_end, int) and im_end != tok.unk_token_id and ids.get("eos_token_id") is not None:
                # a chat model's turn ends with <|im_end|>: generate() stops there too (as Qwen's exports do)
                gen.eos_token_id = [ids["eos_token_id"], im_end]
            gen.save_pretrained(tmp)
            if tok_dir is not None:
                for f in sorted(tok_dir.iterdir()):
                    if f.is_file() and f.name not in _NOT_TOKENIZER and not f.name.startswith("."):
                        shutil.copy2(f, tmp / f.name)
            if config is None:
                config = Config(ckpt=str(ckpt_dir), out=str(out), dtype=dtype, tokenizer=str(tokenizer_dir or ""))
            save_config(config, tmp / EXPORT_CONFIG, checkpoint=str(ckpt), checkpoint_kind=kind,
                        tokenizer_dir=str(tok_dir) if tok_dir is not None else None)
            write_checksums(tmp)
    return out


@dataclass
class Config:
    ckpt: str = opt("", "checkpoint directory (model.safetensors + model_config.json), or a run directory "
                    "(its latest checkpoint)")
    out: str = opt("", "output directory for the Hugging Face Llama model: new, empty or an earlier export "
                   "(replaced); anything else is refused")
    dtype: str = opt("auto", "weight dtype of the export; auto keeps the checkpoint's",
                     choices=("auto", "fp32", "bf16", "fp16"))
    tokenizer: str = opt("", "tokenizer directory to copy (default: <ckpt>/tokenizer/ when present)")
    merge_lora: bool = opt(True, "a LoRA checkpoint (sft/dpo --lora.rank): merge the adapters into the base weights "
                           "and write a plain Llama directory; false refuses LoRA checkpoints (see --adapter)")
    adapter: bool = opt(False, "a LoRA checkpoint: write --out as a PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors) instead of merging")
    base_out: str = opt("", "with --adapter: also export the base model (what the adapter loads onto) here")


def run(cfg: Config) -> int:
    if not cfg.ckpt or not cfg.out:
        raise UserError("give both --ckpt (a checkpoint directory) and --out (the export directory)")
    if cfg.base_out and not cfg.adapter:
        raise UserError("--base-out goes with --adapter (the base model the PEFT adapter loads onto)")
    if cfg.adapter:
        from z2all.model.lora import export_peft_adapter

        base, out = export_peft_adapter(cfg.ckpt, cfg.out, base_out=cfg.base_out or None, dtype=cfg.dtype,
                                        tokenizer_dir=cfg.tokenizer or None, config=cfg)
        print0(f"exported the LoRA adapter of {cfg.ckpt} -> {out} (PEFT format)"
               + (f", its base -> {base}" if base else "") + "; load with peft.PeftModel.from_pretrained(base_model, "
               f"'{out}')")
        return 0
    if not cfg.merge_lora:
        from z2all.model.lora import read_reference

        ckpt, _, _ = resolve_checkpoint(cfg.ckpt, "--ckpt")
        if read_reference(ckpt) is not None:
            raise UserError(f"--ckpt {ckpt} holds LoRA adapters: pass --merge-lora (a plain Llama directory) or "
                            "--adapter (a PEFT adapter directory)")
    out = export_hf(cfg.ckpt, cfg.out, cfg.dtype, cfg.tokenizer or None, config=cfg)
    has_tok = (out / "tokenizer_config.json").exists() or (out / "tokenizer.json").exists()
    print0(f"exported {cfg.ckpt} -> {out} (LlamaForCausalLM{', with tokenizer' if has_tok else ', no tokenizer'}); "
           f"load with transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
