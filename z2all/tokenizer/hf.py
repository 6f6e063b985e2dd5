"""The tokenizer directory every backend writes, and how transformers loads it.

    <dir>/tokenizer.json            tokenizers' format: BPE model + Split(pattern)/ByteLevel pre-tokenizer +
                                    ByteLevel decoder (encoding runs in Rust); specials are added tokens
    <dir>/tokenizer_config.json     for transformers 4.x and 5.x (see `tokenizer_config`)
    <dir>/special_tokens_map.json
    <dir>/tokenization_z2all.py     the `Z2allTokenizer` class, loaded through auto_map
    <dir>/z2all_tokenizer.json      provenance: the resolved config, versions, inputs, counting stats
    <dir>/.z2all-owner.json         "tokenizer train" wrote this directory (z2all.io.claim_output_dir)

Id layout: the base vocabulary (256 bytes, then learned tokens), then the special tokens in order
(<|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>, then the configured extras), then `<|reserved_N|>`
tokens until the total is a multiple of 64 (`pad_to`). Reserved tokens are ordinary special added tokens
that no text produces; they exist so the model's embedding matrix has a GPU-friendly row count (measured
elsewhere: vocab 64320 ran at 55.2% MFU, 64321 at 48.7%) and can later be renamed to real specials
without resizing the model.

Two loading paths, one policy (tests/tokenizer/test_tok_hf.py proves each point on both):
- `AutoTokenizer.from_pretrained(dir)` (no remote code) gives `PreTrainedTokenizerFast`. The config sets
  `split_special_tokens: true`, so `tok("... <|im_end|> ...")` yields no special id; opt in per call with
  `tok(text, split_special_tokens=False)`. Chat on this path (transformers 5.x): load with
  `split_special_tokens=False` and call `apply_chat_template(..., sanitize_control_tokens=True)`: the
  template's specials become real ids and control strings inside messages are encoded as text.
  (A plain `apply_chat_template` on the default-safe load splits the template's own specials: safe, but
  not a usable chat encoding; that is why the custom class exists.)
- `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` gives `Z2allTokenizer`: the same default,
  and `apply_chat_template` builds ChatML ids structurally, safe by construction.

transformers 4.x: only 5.x is installed here. `tokenizer_class` is "PreTrainedTokenizerFast", a name
both majors resolve (5.x's `save_pretrained` writes "TokenizersBackend", which 4.x cannot import;
`Z2allTokenizer.save_pretrained` rewrites it). The specials list is written under
`additional_special_tokens` (the 4.x key; 5.x converts it to `extra_special_tokens`, checked in its
source, tokenization_utils_base.py), and `split_special_tokens` is an init kwarg 4.x also reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from z2all.io import atomic_write_text
from z2all.tokenizer.pretokenize import token_str

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
DEFAULT_SPECIALS = (EOS, IM_START, IM_END, PAD)
RESERVED = "<|reserved_{}|>"
CLASS_FILE = Path(__file__).with_name("tokenization_z2all.py")
PROVENANCE = "z2all_tokenizer.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def special_tokens(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The fixed specials then the configured extras (duplicates dropped, order kept)."""
    out: list[str] = []
    for t in (*DEFAULT_SPECIALS, *extra):
        if t and t not in out:
            out.append(t)
    return out


def byte_level_parts(pattern: str):
    """(pre_tokenizer, decoder) shared by every byte-level tokenizer we write."""
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    return pre, decoders.ByteLevel()


def tokenizer_from_bpe(vocab: list[bytes], merges: list[tuple[int, int]], pattern: str):
    """A `tokenizers.Tokenizer` for our trainer's result (ids as in bpe.py)."""
    from tokenizers import Tokenizer, models

    strs = [token_str(t) for t in vocab]  # once per token: the merges reuse them (~20 ms saved at 8k)
    vocab_map = {}
    for i, s in enumerate(strs):
        vocab_map.setdefault(s, i)
    merge_strs = [(strs[a], strs[b]) for a, b in merges]
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=merge_strs, fuse_unk=False))
    tok.pre_tokenizer, tok.decoder = byte_level_parts(pattern)
    return tok


def add_specials(tok, specials: list[str], pad_to: int = 64) -> dict[str, Any]:
    """Append the special tokens and the reserved padding tokens (ids after the base vocabulary).
    Returns {"base_vocab", "specials": {token: id}, "reserved", "vocab_size"}."""
    from tokenizers import AddedToken

    base = tok.get_vocab_size(with_added_tokens=False)
    for t in specials:
        if tok.token_to_id(t) is not None:
            raise ValueError(f"special token {t!r} is already an ordinary token")
    total = base + len(specials)
    n_reserved = (-total) % pad_to if pad_to > 1 else 0
    reserved = [RESERVED.format(i) for i in range(n_reserved)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + reserved])
    ids = {t: tok.token_to_id(t) for t in specials}
    expected = list(range(base, base + len(specials)))
    if list(ids.values()) != expected:  # the layout others rely on: specials right after the base vocab
        raise RuntimeError(f"special tokens got ids {ids}, expected {expected}")
    return {"base_vocab": base, "specials": ids, "reserved": n_reserved,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True)}


def tokenizer_config(tok, specials: list[str], model_max_length: int) -> dict[str, Any]:
    added = {}
    for tid, at in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {"content": at.content, "lstrip": at.lstrip, "normalized": at.normalized,
                           "rstrip": at.rstrip, "single_word": at.single_word, "special": at.special}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "auto_map": {"AutoTokenizer": [None, "tokenization_z2all.Z2allTokenizer"]},
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [t for t in specials if t not in (EOS, PAD)],
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_dir(tok, out_dir: str | Path, specials: list[str], model_max_length: int = 4096) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the class file. Each file
    is written atomically; the provenance file (written last by the caller) marks a finished directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / PROVENANCE
    if stale.exists():
        stale.unlink()  # a half-rewritten dir must not look finished
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    cfg = tokenizer_config(tok, specials, model_max_length)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    stm = {"eos_token": EOS, "pad_token": PAD,
           "additional_special_tokens": cfg["additional_special_tokens"]}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(stm, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / CLASS_FILE.name, CLASS_FILE.read_text(encoding="utf-8"))
    return out


def load(path: str | Path, trust_remote_code: bool = False, **kwargs):
    """`AutoTokenizer.from_pretrained(path)` offline (the way users and `data tokenize` load it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True,
                                         **kwargs)


def read_tokenizer_json(path: str | Path, option: str = "--tokenizer"):
    """`tokenizers.Tokenizer` from a tokenizer.json file, or from a directory holding one. A missing or
    unreadable file is one UserError naming it (the Rust side raises a bare Exception for any parse error)."""
    from tokenizers import Tokenizer

    from z2all.utils import UserError

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"{option} {p} not found: give a directory made by `z2all tokenizer train`")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises Exception itself
        raise UserError(f"{p} is not a readable tokenizer ({str(e)[:200]}); train it again with "
                        f"`z2all tokenizer train`") from None
