"""Sampling pieces against transformers' logits processors, seeded sampling, and the `z2all generate`
command end to end (checkpoint + real byte-level BPE tokenizer, streaming, stop strings, batched prompts)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_tokenizer_dir, small_config

from z2all.cli import main
from z2all.model.generate import (
    IncrementalText,
    apply_repetition_penalty,
    cut_at_stop,
    filter_logits,
    generate,
    sample_next,
)
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


def test_incremental_text_equals_decoding_everything_and_holds_half_characters(ckpt):
    """Token by token, the text IncrementalText builds is the decode of all ids so far, minus at most a
    trailing half character (a byte-level BPE splits 世/界/😀 into byte tokens); final flushes it; the
    window it decodes stays short (two reads of context at most)."""
    _, tok, _ = ckpt
    text = "你好，世界 😀 def f(x): return x  # 注释\n"
    ids = tok(text)["input_ids"]
    inc, windows = IncrementalText(tok), []
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # the case is exercised
    for i, t in enumerate(ids, 1):
        inc.ids.append(t)
        windows.append(len(inc.ids) - inc.prefix)
        inc.update()
        whole = tok.decode(ids[:i])
        assert "\ufffd" not in inc.text and whole.startswith(inc.text)
        assert whole == inc.text or whole.endswith("\ufffd")
    inc.update(final=True)
    assert inc.text == text and max(windows) < 10
    assert inc.backend  # our tokenizer's decode is the Rust backend's: called directly
    slow = IncrementalText(tok)
    slow.backend = False  # through transformers' decode: the same text
    slow.ids += ids
    assert slow.update(final=True) == text


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


def test_generate_command_errors(ckpt, tmp_path, capsys):
    path, _, _ = ckpt
    for opt, bad in (("--batched-matmul", "mkl"), ("--decode-kernels", "asm")):  # one line naming the option
        assert main(["generate", "--ckpt", str(path), "--prompt", "x", opt, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and opt[2:].replace("-", "_") in err and "Traceback" not in err
    # the compiled kernels are fp32-only: a bf16 model with an explicit --decode-kernels c is refused in one
    # line that says what to use instead (auto takes the torch ops there)
    assert main(["generate", "--ckpt", str(path), "--prompt", "x", "--dtype", "bf16", "--device", "cpu",
                 "--max-new-tokens", "4", "--decode-kernels", "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--decode-kernels c needs an fp32 model" in err and "Traceback" not in err
    assert main(["generate", "--ckpt", str(path), "--prompt", "x", "--dtype", "bf16", "--device", "cpu",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path)]) == 2  # no prompt
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2  # no checkpoint there
    assert main(["generate", "--ckpt", str(path), "--prompt", "x", "--tokenizer", str(tmp_path / "no")]) == 2


def test_vocab_limit_is_never_sampled_and_bad_prompt_ids_are_refused():
    from z2all.utils import UserError

    torch.manual_seed(3)
    model = Z2all(small_config()).eval()
    g = torch.Generator().manual_seed(0)
    out = generate(model, [[1, 2, 3]], 40, temperature=5.0, vocab_limit=10, generator=g)
    assert out[0] and max(out[0]) < 10
    with pytest.raises(UserError, match="outside the model's vocabulary of 97"):
        generate(model, [[1, 200]], 2)


def test_plan_memory_refuses_what_does_not_fit_and_notes_big_or_long(monkeypatch):
    from z2all.model import generate as gen_mod
    from z2all.utils import UserError

    model = Z2all(small_config())  # max_seq_len 64; 2 layers x 2 kv heads x 8 dims x fp32 = 256 B / position
    notes = []
    assert model.kv_cache_bytes(1, 1) == 256
    gen_mod.plan_memory(model, 1, 10, 20, torch.device("cpu"), warn=notes.append)
    assert notes == []
    gen_mod.plan_memory(model, 1, 10, 100, torch.device("cpu"), warn=notes.append)
    assert len(notes) == 1 and "past the model's context of 64" in notes[0]
    monkeypatch.setattr(gen_mod, "_available_memory", lambda device: 256 * 1000)
    with pytest.raises(UserError, match=r"--max-new-tokens 5000: the KV cache .* use --max-new-tokens 890 or less"):
        gen_mod.plan_memory(model, 1, 10, 5000, torch.device("cpu"), warn=notes.append)
    monkeypatch.setattr(gen_mod, "_available_memory", lambda device: 1 << 40)
    notes.clear()
    gen_mod.plan_memory(model, 1, 10, (1 << 30) // 256, torch.device("cpu"), warn=notes.append)
    assert any("KV cache" in n for n in notes)


def test_check_sampling_names_each_option():
    from z2all.model.generate import check_sampling
    from z2all.utils import UserError

    check_sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=1)
    for kw, opt in [({"temperature": float("nan")}, "--temperature"), ({"top_p": 0.0}, "--top-p"),
                    ({"top_k": -1}, "--top-k"), ({"repetition_penalty": -1.0}, "--repetition-penalty"),
                    ({"max_new_tokens": 0}, "--max-new-tokens")]:
        with pytest.raises(UserError, match=opt):
            check_sampling(**kw)


def test_num_threads_sets_and_restores_and_zero_leaves_it():
    from z2all.model.generate import num_threads

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with num_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with num_threads(0):  # 0 = as it is (the demo's and demo_report's "threads" default)
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), num_threads(1):
            raise RuntimeError("restored on the way out too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_generate_command_stops_at_im_end_for_a_chatml_vocabulary(tmp_path, capsys):
    """A ChatML vocabulary's <|im_end|> ends the completion as EOS does (generate.stop_ids, the ids chat and
    serve stop at too): an SFT model's turn ends there. Before, `z2all generate` ran past it, dropping it from
    the text and printing what followed. The model is made to emit <|im_end|> by giving its output row ten
    times the row of a token it picks greedily."""
    from transformers import AutoTokenizer

    from z2all.model.generate import stop_ids

    path = tmp_path / "ckpt"
    tok = AutoTokenizer.from_pretrained(str(make_tokenizer_dir(path / "tokenizer")))
    assert stop_ids(tok) == [tok.eos_token_id]  # no ChatML: EOS only
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(str(path / "tokenizer"))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok) == [tok.eos_token_id, end]
    torch.manual_seed(0)
    model = Z2all(small_config(vocab_size=len(tok))).eval()
    prompt = tok("import os\n")["input_ids"]
    free = generate(model, [prompt], 12)[0]
    with torch.no_grad():
        model.output.weight[end] = 10 * model.output.weight[free[3]]
    free = generate(model, [prompt], 12)[0]
    assert end in free and free.index(end) < 11, free  # it emits <|im_end|> with more to follow
    save_model(model, path)
    assert main(["generate", "--ckpt", str(path), "--prompt", "import os\n", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    want = tok.decode(free[:free.index(end)], skip_special_tokens=True)
    assert capsys.readouterr().out == "import os\n" + want + "\n"
