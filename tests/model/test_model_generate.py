"""Sampling pieces against transformers' logits processors, seeded sampling, and the `z2all generate`
command end to end (checkpoint + real byte-level BPE tokenizer, streaming, stop strings, batched prompts)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_tokenizer_dir, small_config

from z2all.cli import main
from z2all.model.generate import apply_repetition_penalty, cut_at_stop, filter_logits, generate, sample_next
from z2all.model.llama import Z2all, save_model


def test_top_p_and_top_k_keep_what_transformers_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    kept = lambda x: torch.isfinite(x)
    for p in (0.05, 0.3, 0.9):
        assert torch.equal(kept(filter_logits(logits, top_p=p)), kept(TopPLogitsWarper(p)(None, logits.clone())))
    assert torch.equal(kept(filter_logits(logits, top_k=5)), kept(TopKLogitsWarper(5)(None, logits.clone())))
    both = TopPLogitsWarper(0.5)(None, TopKLogitsWarper(3)(None, logits.clone()))
    assert torch.equal(kept(filter_logits(logits, top_k=3, top_p=0.5)), kept(both))
    # sampling draws only from the kept set, and greedy is argmax
    g = torch.Generator().manual_seed(1)
    allowed = kept(filter_logits(logits / 0.7, top_k=5, top_p=0.9))
    for _ in range(50):
        assert allowed[torch.arange(4), sample_next(logits, 0.7, top_k=5, top_p=0.9, generator=g)].all()
    assert torch.equal(sample_next(logits), logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    prev = torch.tensor([[1, 4, 4, 7], [0, 29, 3, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool)
    seen[torch.arange(2)[:, None], prev] = True
    want = RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), want)


def test_seeded_sampling_is_reproducible_and_penalty_avoids_repeats():
    torch.manual_seed(0)
    m = Z2all(small_config()).eval()
    prompts = [[3, 4, 5], [9]]
    run = lambda seed, **kw: generate(m, prompts, 12, temperature=1.0, top_p=0.9,
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert run(7) == run(7)
    assert run(7) != run(8)
    huge = generate(m, [[3, 4, 5]], 20, repetition_penalty=1e6)[0]
    assert len(set(huge)) == len(huge) and not set(huge) & {3, 4, 5}


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "zz"]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("gen") / "ckpt"
    tok = AutoTokenizer.from_pretrained(str(make_tokenizer_dir(path / "tokenizer")))
    torch.manual_seed(0)
    model = Z2all(small_config(vocab_size=len(tok)))
    save_model(model, path)
    return path, tok, model.eval()


def test_generate_command_streams_the_greedy_continuation(ckpt, capsys):
    path, tok, model = ckpt
    prompt = "import os\n"
    want = tok.decode(generate(model, [tok(prompt)["input_ids"]], 12)[0], skip_special_tokens=True)
    assert main(["generate", "--ckpt", str(path), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"
    # a stop string cuts the streamed text before it
    stop = want[len(want) // 2: len(want) // 2 + 2]
    assert main(["generate", "--ckpt", str(path), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--stop", stop, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + cut_at_stop(want, [stop]) + "\n"


def test_generate_command_batch_from_prompt_file(ckpt, capsys, tmp_path):
    path, tok, model = ckpt
    prompts = ["def f(x):", "你好，世界", "a"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    assert main(["generate", "--ckpt", str(path), "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens",
                 "8", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for i, p in enumerate(prompts):
        alone = tok.decode(generate(model, [tok(p)["input_ids"]], 8)[0], skip_special_tokens=True)
        assert f"--- [{i}] ---\n{p}{alone}\n" in out


def test_generate_command_errors(ckpt, tmp_path):
    path, _, _ = ckpt
    assert main(["generate", "--ckpt", str(path)]) == 2  # no prompt
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2  # no checkpoint there
    assert main(["generate", "--ckpt", str(path), "--prompt", "x", "--tokenizer", str(tmp_path / "no")]) == 2
