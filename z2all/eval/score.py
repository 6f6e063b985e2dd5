"""The numbers `z2all eval` reports, computed on our model code for our checkpoints and any Hugging Face
Llama directory alike: bits per byte, multiple-choice log-likelihoods, greedy generative exact match.

    lm = load_lm("runs/demo/train/checkpoints/step-400")        # or an HF LlamaForCausalLM directory
    bpb_per_domain(lm.model, lm.tok, {"zh": docs_zh, "en": docs_en}, max_tokens=100_000)
    lls, greedy = loglikelihoods(lm, items)                      # items from formats.build_items

Bits per byte (tokenizer independent): each document is encoded without special tokens, preceded by the
tokenizer's BOS (else EOS: our models see <|endoftext|> before every training document), and cut into
windows of the model's max_seq_len that overlap by one token, so every token is predicted exactly once
from at most a window of context. bpb = sum of cross-entropy (nats) / ln 2 / UTF-8 bytes of the text.

Multiple choice, the way lm-evaluation-harness scores `loglikelihood` requests (its `_encode_pair`):
  1. Trailing whitespace of the context moves to the front of the continuation ("Answer: " + "A" is scored
     as "Answer:" + " A"), so the space is part of the continuation's first token as BPE merges it.
  2. context ids = encode(context); continuation ids = encode(context + continuation)[len(context ids):],
     i.e. the whole string is encoded once and split at the context's token count. The model is fed
     context ids + continuation ids (the context as encoded alone), which is identical for every choice
     of a question, so we run the context once and share it (below). An empty context becomes [BOS/EOS].
  3. The log-likelihood is the sum of the continuation tokens' log-probs; `is_greedy` is whether each
     was the argmax. acc = argmax of the sums; acc_norm = argmax of sum / len(choice) in characters
     (lm-eval's len(str)); acc_bytes = argmax of sum / UTF-8 bytes of the choice (lm-eval's acc_bytes).
     They agree on ASCII; on Chinese a character is 3 bytes, so the two differ only when choices mix
     scripts. The lengths are those of the choice without the delimiter, as lm-eval takes them.
  4. acc_mi (lm-eval's acc_mutual_info; used for the "which continuation?" set): argmax of the sum minus the
     same choice's sum after the BOS/EOS token alone (context ""), so a choice is not picked for being common.
  5. Too long for the window: like lm-eval, each choice's row keeps the last window + 1 tokens of context +
     continuation (truncate="left"; such an item's choices then run as separate rows, since their cut
     contexts differ), or the item is skipped and counted (truncate="skip"). A continuation longer than
     the window alone is always skipped.

Speed: the questions of a batch are left-padded to one length and run once (KV cache), the cache rows are
repeated per choice and all choices' continuations run as one right-padded batch from there; a one-token
continuation (MMLU's " A") needs the context pass only. lm-eval's `hf` backend runs context + choice once
per choice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from z2all.utils import UserError

LN2 = math.log(2.0)


@dataclass
class LM:
    """A model, its tokenizer and where they came from."""
    model: object  # z2all.model.llama.Z2all, eval mode
    tok: object  # a transformers tokenizer
    name: str
    path: str
    context: int = 0  # > 0: score with windows of this many tokens (the length trained on) instead of max_seq_len

    @property
    def window(self) -> int:
        return self.context or int(self.model.cfg.max_seq_len)

    @property
    def prefix_id(self) -> int | None:
        return prefix_token(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_default(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])


def prefix_token(tok) -> int | None:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return None


# ---------------------------------------------------------------- loading

def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has config.json but no model.safetensors (or index); only safetensors "
                        f"Hugging Face directories load")
    sd = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def load_lm(path: str | Path, tokenizer: str | Path | None = None, device="cpu", dtype=None) -> LM:
    """Our checkpoint (model_config.json) or an HF Llama directory (config.json + safetensors), as our
    Z2all. The tokenizer: `tokenizer`, else <ckpt>/tokenizer/, else the directory itself."""
    from z2all.model.generate import load_tokenizer
    from z2all.model.hf_compat import config_from_hf, hf_to_ours_key
    from z2all.model.llama import CONFIG_FILE, load_model, model_from_state_dict

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--ckpt {path} is not a directory (give a checkpoint step-N/ or an HF Llama directory)")
    if (path / CONFIG_FILE).is_file():
        from z2all.io import verify_checksums

        verify_checksums(path, only=[CONFIG_FILE, "model.safetensors"])  # a clear error for a damaged checkpoint
        model = load_model(path, map_location=device)
    elif (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}/config.json: not a readable Hugging Face config ({e})") from None
        cfg = config_from_hf(hf_cfg)
        sd = {}
        for k, v in _hf_state_dict(path).items():
            if k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight"):
                continue
            try:
                sd[hf_to_ours_key(k)] = v.to(device)
            except KeyError as e:
                raise UserError(f"{path}: {e.args[0]}; not a plain Llama checkpoint") from None
        model = model_from_state_dict(cfg, sd)
    else:
        raise UserError(f"--ckpt {path} holds neither {CONFIG_FILE} (a z2all checkpoint) nor config.json "
                        f"(a Hugging Face directory)")
    if dtype is not None:
        model = model.to(dtype)
    tok_dir = Path(tokenizer) if tokenizer else (path / "tokenizer" if (path / "tokenizer").is_dir() else path)
    if not ((tok_dir / "tokenizer.json").is_file() or (tok_dir / "tokenizer_config.json").is_file()):
        raise UserError(f"no tokenizer in {tok_dir}; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    tok.model_max_length = 1 << 62  # we window long documents ourselves; silences transformers' length warning
    if len(tok) > model.cfg.vocab_size:
        raise UserError(f"tokenizer {tok_dir} has {len(tok)} ids but the model {path} only "
                        f"{model.cfg.vocab_size}: not the model's tokenizer? pass --tokenizer DIR")
    return LM(model.eval(), tok, path.name if path.name not in ("", ".") else str(path), str(path))


# ---------------------------------------------------------------- bits per byte

def _windows(ids: list[int], window: int) -> list[list[int]]:
    """Rows of at most window+1 tokens overlapping by one: inputs row[:-1] predict row[1:]."""
    return [ids[s:s + window + 1] for s in range(0, max(1, len(ids) - 1), window)]


@torch.inference_mode()
def bpb_per_domain(model, tokenizer, texts: dict[str, list[str]], max_tokens: int = 0, batch_size: int = 8,
                   unigram: dict | None = None, window: int = 0) -> dict[str, dict]:
    """{domain: {"bpb", "bits", "bytes", "tokens", "docs", "unigram_bpb"}} for documents `texts[domain]`.
    max_tokens > 0: stop adding documents to a domain once that many tokens are scored (whole documents
    only, so the byte count stays exact). `unigram`: token counts (numpy array over the vocab) for the
    unigram baseline in the same units; None = the in-sample unigram of the scored tokens themselves (a
    lower bound on any unigram model's score). `window` > 0: windows of that many tokens instead of the model's
    max_seq_len (a model trained on shorter rows than its max_seq_len has never seen the later positions).
    Callable from a training loop with the raw model."""
    import numpy as np

    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    window = window or int(model.cfg.max_seq_len)
    prefix = prefix_token(tokenizer)
    out = {}
    try:
        for dom, docs in texts.items():
            rows, n_bytes, n_tokens, n_docs, targets = [], 0, 0, 0, []
            for text in docs:
                if not text:
                    continue
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                if not ids:
                    continue
                b = len(text.encode("utf-8"))
                if prefix is None:  # nothing to condition the first token on: it is not scored
                    b -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
                    seq = ids
                else:
                    seq = [prefix] + ids
                rows += [r for r in _windows(seq, window) if len(r) > 1]
                targets.append(seq[1:])
                n_bytes += b
                n_tokens += len(seq) - 1
                n_docs += 1
                if max_tokens and n_tokens >= max_tokens:
                    break
            nats = 0.0
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                T = max(len(r) for r in chunk) - 1
                idx = torch.zeros(len(chunk), T, dtype=torch.long)
                tgt = torch.full((len(chunk), T), -100, dtype=torch.long)
                for j, r in enumerate(chunk):
                    idx[j, :len(r) - 1] = torch.tensor(r[:-1])
                    tgt[j, :len(r) - 1] = torch.tensor(r[1:])
                idx, tgt = idx.to(device), tgt.to(device)
                _, loss = model(idx, tgt)
                nats += float(loss.float()) * int((tgt != -100).sum())
            res = {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes, "bits": nats / LN2,
                   "bpb": nats / LN2 / n_bytes if n_bytes else float("nan")}
            if n_tokens:
                all_t = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
                V = int(model.cfg.vocab_size)
                if unigram is not None:
                    counts = np.ones(V, dtype=np.float64)
                    counts[:len(unigram)] += np.asarray(unigram[:V], dtype=np.float64)
                else:
                    counts = np.bincount(all_t, minlength=V).astype(np.float64)
                logp = np.log(counts[all_t] / counts.sum())  # only seen tokens: no log(0)
                res["unigram_bpb"] = float(-logp.sum() / LN2 / n_bytes) if n_bytes else float("nan")
            out[dom] = res
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- log-likelihoods (multiple choice)

def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's whitespace rule: the context's trailing whitespace moves onto the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_item(lm: LM, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, [continuation ids]) by lm-eval's boundary rule (see the module docstring). Strings
    are encoded with the tokenizer's default special tokens, as lm-eval's `tok_encode` does (a Llama
    tokenizer adds BOS to both the context and the whole; ours adds nothing). A continuation that the joint
    encoding swallows into the context (no tokens left) falls back to its own encoding, so it is scored."""
    if context == "":
        prefix = lm.prefix_id if lm.prefix_id is not None else 0
        out = []
        for c in continuations:
            ids = lm.encode(c)
            out.append(ids if ids and ids[0] != prefix else ids[1:])
        return [prefix], out
    ctx_s = split_pair(context, "")[0]
    ctx_ids = lm.encode_default(ctx_s)
    conts = []
    for c in continuations:
        cs, cont = split_pair(context, c)
        whole = lm.encode_default(cs + cont)
        conts.append(whole[len(ctx_ids):] or lm.encode(cont))
    return ctx_ids, conts


@torch.inference_mode()
def _score_batch(model, rows: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
    """rows: (context ids, [continuation ids per choice]) -> per row, per choice (sum log-prob, greedy)."""
    device = model.tok_embeddings.weight.device
    B = len(rows)
    P = max(len(c) for c, _ in rows)
    Tc = max(len(x) for _, conts in rows for x in conts) - 1
    padded = any(len(c) != P for c, _ in rows)
    idx = torch.zeros(B, P, dtype=torch.long)
    mask = torch.ones(B, P + max(Tc, 0), dtype=torch.bool)
    for b, (c, _) in enumerate(rows):
        idx[b, P - len(c):] = torch.tensor(c)
        mask[b, :P - len(c)] = False
    idx, mask = idx.to(device), mask.to(device)
    cache = model.new_kv_cache(B, P + Tc) if Tc > 0 else None
    logits, _ = model(idx, kv_cache=cache, start_pos=0, key_padding_mask=mask[:, :P] if padded else None,
                      logits_to_keep=1)
    first = logits[:, -1].float().log_softmax(-1)  # [B, V]: predicts every continuation's first token
    first_arg = first.argmax(-1).tolist()
    owner = [b for b, (_, conts) in enumerate(rows) for _ in conts]
    conts = [x for _, cs in rows for x in cs]
    first_lp = first[torch.tensor(owner, device=device), torch.tensor([x[0] for x in conts], device=device)].tolist()
    rest_lp = [0.0] * len(conts)
    rest_greedy = [True] * len(conts)
    if Tc > 0:
        sel = torch.tensor(owner, device=device)
        cache.k = [k.index_select(0, sel) for k in cache.k]
        cache.v = [v.index_select(0, sel) for v in cache.v]
        R = len(conts)
        inp = torch.zeros(R, Tc, dtype=torch.long)
        tgt = torch.zeros(R, Tc, dtype=torch.long)
        valid = torch.zeros(R, Tc, dtype=torch.bool)
        for r, x in enumerate(conts):
            n = len(x) - 1
            if n:
                inp[r, :n] = torch.tensor(x[:-1])
                tgt[r, :n] = torch.tensor(x[1:])
                valid[r, :n] = True
        inp, tgt, valid = inp.to(device), tgt.to(device), valid.to(device)
        lg, _ = model(inp, kv_cache=cache, start_pos=P,
                      key_padding_mask=mask.index_select(0, sel) if padded else None)
        lp = lg.float().log_softmax(-1)
        tok_lp = lp.gather(-1, tgt[..., None]).squeeze(-1)
        greedy = (lp.argmax(-1) == tgt) | ~valid
        rest_lp = (tok_lp * valid).sum(-1).tolist()
        rest_greedy = greedy.all(-1).tolist()
    out: list[list[tuple[float, bool]]] = [[] for _ in rows]
    for r, (b, x) in enumerate(zip(owner, conts)):
        out[b].append((first_lp[r] + rest_lp[r], bool(first_arg[b] == x[0] and rest_greedy[r])))
    return out


def loglikelihoods(lm: LM, items, batch_size: int = 8, truncate: str = "left"):
    """Per item, per choice (sum log-prob, greedy), or None for an item skipped because it does not fit
    the window (truncate="skip", or a continuation alone longer than the window). Items are encoded,
    sorted by length (long first, so the first batch shows a memory problem early), batched
    `batch_size` questions at a time, and returned in the original order."""
    window = lm.window
    rows, back = [], []  # rows: (context ids, [continuation ids]); back: (item, first choice index)
    results: list = [None] * len(items)
    for i, it in enumerate(items):
        ctx, conts = encode_item(lm, it.context, it.continuations)
        longest = max(len(c) for c in conts)
        if len(ctx) + longest - 1 <= window:
            rows.append((ctx, conts))
            back.append((i, 0))
            continue
        if truncate == "skip" or longest > window:
            continue
        # lm-eval's cut, per choice: each row keeps the last window + 1 tokens of context + continuation
        results[i] = [None] * len(conts)
        for j, c in enumerate(conts):
            rows.append((ctx[len(ctx) + len(c) - 1 - window:] if len(ctx) + len(c) - 1 > window else ctx, [c]))
            back.append((i, j))
    order = sorted(range(len(rows)), key=lambda r: -(len(rows[r][0]) + max(len(c) for c in rows[r][1])))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        for r, res in zip(chunk, _score_batch(lm.model, [rows[r] for r in chunk])):
            i, j = back[r]
            if results[i] is None:
                results[i] = res
            else:
                results[i][j:j + len(res)] = res
    return results


def unconditional_loglikelihoods(lm: LM, items, batch_size: int = 8):
    """Per item, per choice (sum log-prob, greedy) of the continuation after the BOS/EOS token alone (the
    context replaced by "", as lm-eval's acc_mutual_info scores it), or None for an item skipped."""
    import dataclasses

    return loglikelihoods(lm, [dataclasses.replace(it, context="") for it in items], batch_size)


def choose_mutual_info(lls: list[float], unconditional: list[float]) -> int:
    """acc_mutual_info's prediction: argmax of log p(choice | context) - log p(choice). It credits what the
    context adds, not how likely a choice is on its own: on the "which continuation?" set, whose distractors
    are real spans of other documents, plain acc is dominated by how common each span is in general."""
    gain = [a - b for a, b in zip(lls, unconditional)]
    return max(range(len(gain)), key=lambda i: (gain[i], -i))


def choose(lls: list[float], choices: list[str]) -> tuple[int, int, int]:
    """(pred for acc, acc_norm, acc_bytes). Ties go to the first choice, as numpy's argmax."""
    def argmax(vals):
        return max(range(len(vals)), key=lambda i: (vals[i], -i))

    def per(ll, n):  # an empty choice: numpy's ll / 0 = -inf (lm-eval never picks it), not an error
        return ll / n if n else (float("-inf") if ll < 0 else float("inf"))

    chars = [per(ll, len(c)) for ll, c in zip(lls, choices)]
    nbytes = [per(ll, len(c.encode("utf-8"))) for ll, c in zip(lls, choices)]
    return argmax(lls), argmax(chars), argmax(nbytes)


# ---------------------------------------------------------------- generative exact match

def _prompt_ids(lm: LM, text: str, chat: bool) -> list[int]:
    if chat:
        ids = lm.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = lm.encode(text)
    return ids or [lm.prefix_id if lm.prefix_id is not None else 0]


def has_chat_template(lm: LM) -> bool:
    return bool(getattr(lm.tok, "chat_template", None))


def normalize_answer(s: str) -> str:
    return " ".join(s.strip().split())


def exact_match(lm: LM, items, max_new_tokens: int = 32, stops: list[str] | None = None, chat: bool = False,
                batch_size: int = 8, truncate: str = "left"):
    """Per item (generated text cut at the first stop string, correct) or None when the prompt does not
    fit. Greedy; correct = the whitespace-normalised text equals one of the item's answers."""
    from z2all.model.generate import _stop_checker, cut_at_stop, generate

    stops = list(stops or [])
    limit = lm.window - max_new_tokens
    prompts = []
    for it in items:
        ids = _prompt_ids(lm, it.context, chat)
        if len(ids) > limit:
            ids = None if truncate == "skip" or limit <= 0 else ids[-limit:]
        prompts.append(ids)
    out: list = [None] * len(items)
    todo = [i for i, p in enumerate(prompts) if p is not None]
    eos = [t for t in {getattr(lm.tok, "eos_token_id", None)} if t is not None]
    stopper = _stop_checker(lm.tok, stops) if stops else None
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        # ids past the tokenizer (a vocabulary padded for speed) decode to nothing: never generate them
        gen = generate(lm.model, [prompts[i] for i in chunk], max_new_tokens, temperature=0.0, eos_id=eos,
                       should_stop=stopper, vocab_limit=len(lm.tok))
        for i, new in zip(chunk, gen):
            text = cut_at_stop(lm.tok.decode(new, skip_special_tokens=True), stops)
            ok = normalize_answer(text) in {normalize_answer(a) for a in items[i].answers}
            out[i] = (text, ok)
    return out
