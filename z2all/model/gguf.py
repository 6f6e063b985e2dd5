"""GGUF export for llama.cpp (and what runs on it: Ollama, LM Studio), written with the `gguf` package
(llama.cpp's own Python writer). `z2all export gguf`:

    z2all export gguf --ckpt runs/demo/train --out demo.gguf                  # f32
    z2all export gguf --ckpt exports/demo-hf --out demo-q8.gguf --dtype q8_0  # any HF Llama dir we import

--ckpt takes what `z2all generate` takes: a checkpoint (step-N/), a run directory (its latest checkpoint)
or a Hugging Face Llama directory (our `export hf` output or any Llama our import accepts). The file is
written to a temp file beside --out and renamed; an existing --out is replaced only if an earlier
`export gguf` wrote it (its `<out>.z2all.json` sidecar, holding the resolved config, says so).

What goes in (architecture `llama`, the layout llama.cpp's convert_hf_to_gguf.py produces):

    ours                                   GGUF                        note
    tok_embeddings.weight                  token_embd.weight
    layers.{i}.attention_norm.weight       blk.{i}.attn_norm.weight    always f32 (1-D)
    layers.{i}.attention.wq / wk           blk.{i}.attn_q / attn_k     rows permuted, see below
    layers.{i}.attention.wv / wo           blk.{i}.attn_v / attn_output
    layers.{i}.ffn_norm.weight             blk.{i}.ffn_norm.weight     always f32 (1-D)
    layers.{i}.feed_forward.w1 / w3 / w2   blk.{i}.ffn_gate / ffn_up / ffn_down
    norm.weight                            output_norm.weight          always f32 (1-D)
    output.weight                          output.weight               absent when tied (llama.cpp reuses
                                                                       token_embd)

RoPE layout: our model (like transformers) rotates the two halves of each head (rotate-half); llama.cpp's
`llama` architecture rotates adjacent pairs (Meta's original interleaved layout). Permuting the rows of
wq and wk within each head, from [x0..x_{d/2-1}, y0..y_{d/2-1}] to [x0, y0, x1, y1, ...], makes the
interleaved rotation of the permuted projection equal the rotate-half rotation of ours (q·k is unchanged
because both sides are permuted alike). wk uses the key-value head count.

Tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE) with the vocabulary in tokenizer.json's byte
spelling, the merges in rank order, token types (special tokens CONTROL, padding rows UNUSED), bos = eos =
`<|endoftext|>` (we never add BOS; `add_bos_token = false`, but a real id keeps runtimes from picking a
random one), eot = `<|im_end|>`, pad, and the chat template. `tokenizer.ggml.pre` names the llama.cpp
pre-tokenizer that reproduces our split pattern: exact for the patterns llama.cpp implements
(`z2all tokenizer train --pattern llama-bpe|qwen2`). Our default pattern cuts Han runs into pieces of at
most 4 characters, which no llama.cpp pre-tokenizer does; such a tokenizer is exported with the closest
one (`qwen2`) and a warning that names what differs (Chinese text is split into different tokens, so
llama.cpp's ids differ from ours there; weights and all other text are unaffected).

Types: f32, f16 and bf16 store every 2-D matrix in that type; q8_0 quantises every 2-D matrix whose row
length is a multiple of 32 (blocks of 32 weights with one f16 scale: ~8.5 bits per weight, about 1/4 of
f32) and keeps the others in f16. 1-D tensors (norms) stay f32 in all cases, as llama.cpp expects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z2all.config import opt, save_config
from z2all.utils import UserError, print0

GGUF_COMMAND = "export gguf"
_DTYPES = ("f32", "f16", "bf16", "q8_0")
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'llm-zero2all[gguf]' (or pip install gguf)"
                        ) from None
    return gguf


def gguf_name(ours: str) -> str:
    """Our state-dict key -> the GGUF tensor name (see the table in the module docstring)."""
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"no GGUF name for tensor {ours!r}")


def rotate_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [n_heads*head_dim, in] from rotate-half to interleaved pair order, per head."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizer names whose regexes equal a pattern `z2all tokenizer train --pattern` offers
def _llama_cpp_pre(pattern: str | None) -> tuple[str, str | None]:
    """(tokenizer.ggml.pre value, warning or None) for a split pattern taken from tokenizer.json."""
    from z2all.tokenizer.pretokenize import LLAMA_CPP_PRE, NAMED_PATTERNS

    for name, pat in NAMED_PATTERNS.items():
        if pattern == pat and name in LLAMA_CPP_PRE:
            return LLAMA_CPP_PRE[name], None
    warning = ("this tokenizer's split pattern (Han runs cut into pieces of at most N characters) has no "
               "llama.cpp pre-tokenizer; exported with 'qwen2' (whole Han runs): llama.cpp will split "
               "Chinese text differently from z2all and transformers, so its token ids (and thus outputs) "
               "differ on Chinese; English, code and the weights are unaffected. For an exact match train "
               "the tokenizer with `z2all tokenizer train --pattern qwen2` (or llama-bpe)")
    if pattern is None:
        warning = ("this tokenizer has no byte-level split pattern (not a z2all/hf-backend BPE); exported with "
                   "'default': llama.cpp's tokenization may differ from ours")
        return "default", warning
    return "qwen2", warning


def _split_pattern(tok_json: dict) -> str | None:
    pre = tok_json.get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Split":
            pat = p.get("pattern", {})
            return pat.get("Regex") or pat.get("String")
    return None


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int
    eos: int
    eot: int | None
    pad: int | None
    pre: str
    warning: str | None
    chat_template: str | None


def read_vocab(tok_dir: Path, n_vocab: int) -> GGUFVocab:
    """The GGUF view of our tokenizer directory, padded with UNUSED rows to the model's n_vocab rows."""
    TokenType = _gguf().TokenType
    file = tok_dir / "tokenizer.json"
    try:
        tj = json.loads(file.read_text(encoding="utf-8"))
        model = tj["model"]
        vocab: dict[str, int] = model["vocab"]
    except FileNotFoundError:
        raise UserError(f"{file} not found: a GGUF needs the tokenizer; give --tokenizer DIR") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{file} is not a valid tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or not model.get("merges"):
        raise UserError(f"{file}: only byte-level BPE tokenizers export to GGUF (this one is "
                        f"{model.get('type')}); train with the z2all or hf backend")
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: s for s, i in vocab.items()}
    for s, t in added.items():
        by_id[t["id"]] = s
    size = max(by_id) + 1
    if size > n_vocab:
        raise UserError(f"{file} has {size} tokens but the model has {n_vocab} embedding rows; "
                        f"the tokenizer does not belong to this model")
    tokens, types = [], []
    for i in range(n_vocab):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(s)
            special = s in added and added[s].get("special", False)
            types.append(TokenType.CONTROL if special else
                         TokenType.USER_DEFINED if s in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def sid(name: str) -> int | None:
        return added[name]["id"] if name in added else vocab.get(name)

    eos = sid("<|endoftext|>")
    if eos is None:
        raise UserError(f"{file} has no <|endoftext|> token; cannot name the end-of-text id for llama.cpp")
    template = None
    cfg_file = tok_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            template = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as e:
            raise UserError(f"{cfg_file} is not valid JSON ({e})") from None
    pre, warning = _llama_cpp_pre(_split_pattern(tj))
    pad = sid("<|pad|>")
    return GGUFVocab(tokens, [int(t) for t in types], merges, bos=eos, eos=eos, eot=sid("<|im_end|>"),
                     pad=pad if pad is not None else eos, pre=pre, warning=warning, chat_template=template)


# ---------------------------------------------------------------------- writer

def _tensor_data(name: str, t: torch.Tensor, dtype: str):
    """(array, raw_dtype or None) for one tensor in the requested file type."""
    gguf = _gguf()
    GGMLQuantizationType, quants = gguf.GGMLQuantizationType, gguf.quants
    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "f32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    if dtype == "bf16":
        return quants.quantize(a, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if a.shape[-1] % 32 == 0:
        return quants.quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def write_gguf(model, tok_dir: Path, out: str | os.PathLike, dtype: str = "f32", name: str = "z2all") -> dict:
    """Write `model` (a Z2all) and the tokenizer in `tok_dir` to the GGUF file `out` (via a temp file).
    Returns a summary: tensors, bytes, the pre-tokenizer and the warning (if any)."""
    gguf = _gguf()
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
    cfg = model.cfg
    voc = read_vocab(tok_dir, cfg.vocab_size)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name)
        w.add_file_type(int(file_type))
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(voc.pre)
        w.add_token_list(voc.tokens)
        w.add_token_types(voc.types)
        w.add_token_merges(voc.merges)
        w.add_bos_token_id(voc.bos)
        w.add_eos_token_id(voc.eos)
        if voc.eot is not None:
            w.add_eot_token_id(voc.eot)
        if voc.pad is not None:
            w.add_pad_token_id(voc.pad)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if voc.chat_template:
            w.add_chat_template(voc.chat_template)
        n_bytes = 0
        sd = model.state_dict()
        if dtype == "f16":
            from z2all.model.llama import check_fp16_range

            check_fp16_range(sd.items())
        as_f16 = []  # q8_0: matrices whose rows are not a multiple of its 32-value blocks stay f16
        for key, t in sd.items():
            if key == "output.weight" and cfg.tie_embeddings:
                continue
            arr = t.detach().to(torch.float32).cpu()
            if key.endswith("attention.wq.weight"):
                arr = torch.from_numpy(rotate_half_to_interleaved(arr.numpy(), cfg.n_heads))
            elif key.endswith("attention.wk.weight"):
                arr = torch.from_numpy(rotate_half_to_interleaved(arr.numpy(), cfg.n_kv_heads))
            data, raw = _tensor_data(key, arr, dtype)
            if dtype == "q8_0" and data.dtype == np.float16:
                as_f16.append(gguf_name(key))
            if raw is None:
                w.add_tensor(gguf_name(key), data)
            else:
                w.add_tensor(gguf_name(key), data, raw_shape=data.shape, raw_dtype=raw)
            n_bytes += data.nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"tensors": len(sd) - (1 if cfg.tie_embeddings else 0), "tensor_bytes": n_bytes, "pre": voc.pre,
            "warning": voc.warning, "file_bytes": out.stat().st_size, "f16_in_q8_0": as_f16}


# ---------------------------------------------------------------------- command

@dataclass
class Config:
    ckpt: str = opt("", "checkpoint directory, run directory (latest checkpoint) or Hugging Face Llama directory")
    out: str = opt("", "the .gguf file to write (an existing file is replaced only if `export gguf` wrote it)")
    dtype: str = opt("f32", "tensor type of the 2-D weights (norms stay f32)", choices=_DTYPES)
    tokenizer: str = opt("", "tokenizer directory (default: the checkpoint's tokenizer/ or the HF directory)")
    name: str = opt("", "general.name in the file (default: the run or directory name)")


def sidecar(out: Path) -> Path:
    """`<out>.z2all.json`: the resolved config and summary of the export, which also marks the file as ours."""
    return out.with_name(out.name + ".z2all.json")


def _claim_file(out: Path, protect: list[Path]) -> Path:
    """An output *file* under the rule for output directories: new, or written by `export gguf` before (its
    sidecar says so), and never one of the inputs."""
    if not str(out):
        raise UserError("--out is empty; give the .gguf file to write")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path such as {out / 'model.gguf'}")
    for p in protect:
        if p.exists() and (out.resolve() == p.resolve() or p.resolve() in out.resolve().parents):
            raise UserError(f"--out {out} lies inside the input {p}; choose a path outside it")
    if out.exists():
        try:
            owner = json.loads(sidecar(out).read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner != GGUF_COMMAND:
            raise UserError(f"--out {out} exists and was not written by `z2all export gguf`; choose another path "
                            f"(nothing was changed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def run(cfg: Config) -> int:
    from z2all.model.hf_compat import default_tokenizer_dir, load_checkpoint

    if not cfg.ckpt or not cfg.out:
        raise UserError("give both --ckpt (a checkpoint, run or HF directory) and --out (the .gguf file)")
    if cfg.out.endswith(("/", os.sep)):  # Path() drops the slash: "newdir/" would become a file named newdir
        raise UserError(f"--out {cfg.out} names a directory; give the .gguf file to write, such as "
                        f"{Path(cfg.out) / 'model.gguf'}")
    model, directory, kind, note = load_checkpoint(cfg.ckpt)
    if note:
        print0(note)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir(directory, kind)
    if not tok_dir.is_dir():
        raise UserError(f"tokenizer directory {tok_dir} not found; give --tokenizer DIR")
    out = _claim_file(Path(cfg.out), [Path(cfg.ckpt), directory, tok_dir])
    name = cfg.name or (directory.parent.parent.name if directory.parent.name == "checkpoints" else directory.name)
    info = write_gguf(model.float(), tok_dir, out, cfg.dtype, name)
    save_config(cfg, sidecar(out), command=GGUF_COMMAND, source=str(directory), **info)
    if info["warning"]:
        print0(f"warning: {info['warning']}")
    if info["f16_in_q8_0"]:
        n = len(info["f16_in_q8_0"])
        print0(f"note: {n} of {info['tensors']} tensors are f16, not q8_0: their rows are not a multiple of "
               f"q8_0's 32-value blocks (e.g. {info['f16_in_q8_0'][0]}; all are listed in {sidecar(out)})")
    print0(f"exported {directory} -> {out} ({cfg.dtype}, {info['file_bytes'] / 1e6:.1f} MB, "
           f"pre-tokenizer {info['pre']}); run with llama.cpp: llama-cli -m {out}")
    return 0
