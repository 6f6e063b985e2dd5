"""llama.cpp runs our GGUF export exactly (slow; needs llama-cpp-python, which builds from its PyPI source in
~6 min on 2 cores: pip install 'llm-zero2all[llamacpp]'). A tiny model with a llama.cpp-known split pattern
(llama-bpe) is exported at f32, f16 and q8_0 and loaded with `llama_cpp.Llama`:
  f32   logits on a prompt within 1e-3 of ours, 32 greedy tokens identical
  f16   32 greedy tokens identical, logits close
  q8_0  greedy agreement and top-1 agreement over 64 positions printed (and bounded loosely)
Measured (x86_64, 2 cores, llama-cpp-python 0.3.36): f32 max |logit diff| 8.6e-4; f16 2.8e-3, top-1 1.00,
greedy 32/32; q8_0 6.2e-2, top-1 0.89, greedy 32/32.
and llama.cpp's own tokenizer gives our ids on English, Python and Chinese strings. `z2all bench llamacpp` runs on a
checkpoint (equal greedy tokens) and on --preset (the forced-threads, llama.cpp 1-thread and engine rows)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(pip install 'llm-zero2all[llamacpp]'; builds from source in ~6 min)")

from test_model_gguf import make_tokenizer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from z2all.model import gguf as ours  # noqa: E402
from z2all.model.config import ModelConfig  # noqa: E402
from z2all.model.llama import Z2all, save_model  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog, 1234567 times.",
         "def __init__(self, x):\n    self.x = x  # 注释\n\treturn None\n",
         "中华人民共和国是一个位于东亚的国家，首都是北京。", "  mixed 中文 and English 42\n\n"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    tok = make_tokenizer(root / "tok", pattern="llama-bpe", vocab_size=512)
    tj = json.loads((tok / "tokenizer.json").read_text())
    n_tok = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=n_tok, ffn_dim=128,
                      max_seq_len=256, rope_theta=10000.0, init_std=0.08)
    torch.manual_seed(0)
    model = Z2all(cfg).eval()
    d = save_model(model, root / "step-000001")
    shutil.copytree(tok, d / "tokenizer")
    files = {}
    for dt in ("f32", "f16", "q8_0"):
        files[dt] = root / f"m-{dt}.gguf"
        ours.run(ours.Config(ckpt=str(d), out=str(files[dt]), dtype=dt))
    return model, Tokenizer.from_file(str(tok / "tokenizer.json")), files


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           n_threads=2, seed=0)


def _logits(model, ids) -> np.ndarray:
    """[T, V] logits of our model (forward returns (logits [B, T, V], loss))."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def _ours_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def _cpp_greedy(llm, ids, n):
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def test_llama_cpp_tokenizes_like_us(exported):
    _, tok, files = exported
    llm = _llama(files["f32"])
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids, text


def test_f32_logits_and_greedy_match(exported):
    model, tok, files = exported
    ids = tok.encode(TEXTS[0]).ids
    llm = _llama(files["f32"])
    llm.eval(ids)
    cpp = np.asarray(llm.scores[: len(ids)])
    ref = _logits(model, ids)
    diff = np.abs(cpp - ref).max()
    print(f"f32 max |logit diff| = {diff:.2e}")
    assert diff < 1e-3
    assert _cpp_greedy(llm, ids, 32) == _ours_greedy(model, ids, 32)


def test_f16_and_q8_0_agreement(exported):
    model, tok, files = exported
    ids = tok.encode(TEXTS[2] + TEXTS[0]).ids[:64]
    ref = _logits(model, ids)
    want = _ours_greedy(model, ids, 32)
    for dt in ("f16", "q8_0"):
        llm = _llama(files[dt])
        llm.eval(ids)
        cpp = np.asarray(llm.scores[: len(ids)])
        top1 = float((cpp.argmax(-1) == ref.argmax(-1)).mean())
        got = _cpp_greedy(llm, ids, 32)
        same = sum(a == b for a, b in zip(got, want))
        print(f"{dt}: max |logit diff| {np.abs(cpp - ref).max():.2e}, top-1 agreement over {len(ids)} positions "
              f"{top1:.3f}, greedy tokens equal {same}/32")
        if dt == "f16":
            assert got == want and top1 >= 0.99
        else:  # q8_0 on random weights: near-tied logits flip (measured 0.89 top-1, 32/32 greedy); reported
            assert top1 >= 0.8


def test_bench_llamacpp_table(exported, capsys):
    """`z2all bench llamacpp` runs ours and llama.cpp on the same checkpoint and reports equal greedy tokens."""
    from z2all.bench import llamacpp

    _, _, files = exported
    ckpt = files["f32"].parent / "step-000001"
    assert llamacpp.run(llamacpp.Config(ckpt=str(ckpt), new_tokens=16, repeats=1, threads=1,
                                        dtypes=["f32"])) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| llama.cpp f32") or r.startswith("| generate() in-process")]
    assert len(rows) == 3 and all("| 16/16" in r for r in rows), out


def test_bench_llamacpp_preset_engine_and_thread_rows(capsys):
    """--preset builds a random-weight model with the demo BPE; with 2 threads the table also has the forced
    other-thread row, llama.cpp on 1 thread, and the engine's aggregate row; every row has its ratio."""
    from z2all.bench import llamacpp

    assert llamacpp.run(llamacpp.Config(preset="tiny", new_tokens=8, repeats=1, threads=2, streams=3,
                                        dtypes=["f32"])) == 0
    out = capsys.readouterr().out
    assert "preset tiny (random weights, demo BPE)" in out
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in out.splitlines()
            if r.startswith(("| z2all", "| generate()", "| llama.cpp"))}
    assert set(rows) == {"generate() in-process, plain forward (1 thr)", "generate() in-process, fast decode (1 thr)",
                         "generate() in-process, fast decode (2 thr, forced)",
                         "z2all engine, 3 streams aggregate (in-process, 1 thr)",
                         "llama.cpp f32 (28.8 MB)", "llama.cpp f32-1 (1 thr)"}, out
    assert all(cells[1].endswith("x") and cells[2].endswith("/8") for cells in rows.values())
    assert rows["llama.cpp f32 (28.8 MB)"][1] == "1.00x"
