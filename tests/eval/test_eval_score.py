"""The numbers of z2all.eval.score: bits per byte recomputed through transformers on the HF export (and
through our import of that export), multiple-choice log-likelihoods of the shared-context batched path
against one plain forward per choice (padding, truncation, one-token and empty-context cases), the lm-eval
boundary rule, greedy exact match with stop strings, and the corpus continuation task."""

from __future__ import annotations

import math

import pytest
import torch
from eval_helpers import demo_docs

from z2all.eval import score, tasks
from z2all.eval.formats import Item


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory):
    from z2all.model.hf_compat import export_hf

    return export_hf(ckpt, tmp_path_factory.mktemp("hf") / "export")


def _hf_bpb(model, tok, docs, window):
    nats, nbytes = 0.0, 0
    for text in docs:
        seq = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(seq) - 1, window):
            row = torch.tensor([seq[s:s + window + 1]])
            with torch.no_grad():
                logits = model(row[:, :-1]).logits.float()
            nats += float(torch.nn.functional.cross_entropy(logits[0], row[0, 1:], reduction="sum"))
        nbytes += len(text.encode("utf-8"))
    return nats / math.log(2) / nbytes


def test_bpb_matches_transformers_on_the_hf_export(lm, hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = {"zh": demo_docs(n=3, chars=400), "code": demo_docs("code_python.jsonl.gz", "content", n=2, chars=300)}
    assert max(len(lm.encode(t)) for t in docs["zh"]) > lm.window  # the windowing is exercised
    ours = score.bpb_per_domain(lm.model, lm.tok, docs, batch_size=3)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    for dom, texts in docs.items():
        assert ours[dom]["bpb"] == pytest.approx(_hf_bpb(hf, tok, texts, lm.window), rel=1e-5)
        assert ours[dom]["bytes"] == sum(len(t.encode()) for t in texts) and ours[dom]["docs"] == len(texts)
        assert 0 < ours[dom]["unigram_bpb"] < ours[dom]["bpb"]  # random weights: worse than unigram
    # the HF directory imported as our model gives the same numbers
    imported = score.load_lm(hf_dir)
    again = score.bpb_per_domain(imported.model, imported.tok, docs)
    assert again["zh"]["bpb"] == pytest.approx(ours["zh"]["bpb"], rel=1e-6)
    # max_tokens keeps whole documents
    capped = score.bpb_per_domain(lm.model, lm.tok, {"zh": docs["zh"]}, max_tokens=10)
    assert capped["zh"]["docs"] == 1 and capped["zh"]["bytes"] == len(docs["zh"][0].encode())


def _reference(lm, item):
    """One plain forward per choice of lm-eval's row: (context + continuation)[-(window+1):][:-1]."""
    out = []
    for c in item.continuations:
        ctx, (cont,) = score.encode_item(lm, item.context, [c])
        row = (ctx + cont)[-(lm.window + 1):]
        with torch.no_grad():
            logits, _ = lm.model(torch.tensor([row[:-1]]))
        lp = logits[0, -len(cont):].float().log_softmax(-1)
        out.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def test_mc_shared_context_batches_equal_one_forward_per_choice(lm):
    docs = demo_docs(n=8)
    items = [Item(d[:k], [d[k:k + n], d[k + 5:k + 5 + n], " A"], [], 0, "t")
             for d, k, n in zip(docs, (5, 40, 70, 20, 130, 60, 90, 10), (9, 3, 14, 1, 6, 22, 2, 8))]
    items.append(Item("Question: pick one.\nAnswer: ", ["A", "B", "C"], [], 0, "one-token"))
    items.append(Item("", ["the cat", "a dog"], [], 0, "empty context"))
    items.append(Item(docs[0][:400], ["xyz", docs[0][400:460]], [], 0, "longer than the window"))
    got = score.loglikelihoods(lm, items, batch_size=4)
    for it, r in zip(items, got):
        ref = _reference(lm, it)
        assert [x[0] for x in r] == pytest.approx(ref, abs=2e-4), it.where
    skip = score.loglikelihoods(lm, items[-1:], truncate="skip")
    assert skip == [None]


def test_boundary_rule_moves_trailing_space_and_splits_the_joint_encoding(lm):
    assert score.split_pair("Answer: ", "A") == ("Answer:", " A")
    assert score.split_pair("x\n\n", "y") == ("x", "\n\ny")
    ctx, (cont,) = score.encode_item(lm, "Answer: ", ["A"])
    assert ctx == lm.encode("Answer:")
    assert cont == lm.encode("Answer: A")[len(ctx):]
    assert lm.tok.decode(cont) == " A"
    ctx, conts = score.encode_item(lm, "", ["the cat"])
    assert ctx == [lm.tok.eos_token_id] and conts == [lm.encode("the cat")]


def test_choose_acc_norm_chars_vs_bytes():
    # equal log-likelihood per character, but the Chinese choice has 3 bytes per character
    pred, pred_norm, pred_bytes = score.choose([-6.0, -4.0, -9.0], ["中文字", "ab", "abc"])
    assert (pred, pred_norm, pred_bytes) == (1, 0, 0)
    assert score.choose([-6.0, -2.5, -9.0], ["中文字", "ab", "abc"])[1:] == (1, 0)  # per char: ab; per byte: 中文字


def test_exact_match_greedy_with_stop_strings(lm):
    prompts = ["def main(", "中国的", "The "]
    raw = score.exact_match(lm, [Item(p, [], [], 0, "g", ["?"]) for p in prompts], max_new_tokens=12)
    outs = [r[0] for r in raw]
    assert all(not ok for _, ok in raw)
    stop = outs[0][3:5] or outs[0][:1]
    items = [Item(p, [], [], 0, "g", [o.split(stop)[0] + "  " if i == 0 else o]) for i, (p, o) in
             enumerate(zip(prompts, outs))]
    got = score.exact_match(lm, items, max_new_tokens=12, stops=[stop], batch_size=2)
    assert got[0][0] == outs[0].split(stop)[0] and all(ok for _, ok in got[:1])
    long = Item("x" * 2000, [], [], 0, "long", ["a"])
    assert score.exact_match(lm, [long], max_new_tokens=8, truncate="skip") == [None]
    assert score.exact_match(lm, [long], max_new_tokens=8)[0] is not None


def test_continuation_items_are_deterministic_and_same_domain():
    docs = demo_docs(n=10)
    a = tasks.continuation_items(docs, n_choices=4, ctx_bytes=120, span_bytes=24, seed=3)
    b = tasks.continuation_items(docs, n_choices=4, ctx_bytes=120, span_bytes=24, seed=3)
    assert [(i.context, i.continuations, i.gold) for i in a] == [(i.context, i.continuations, i.gold) for i in b]
    assert 8 <= len(a) <= 10 and {i.gold for i in a} != {0}  # a document without a cut place gives none
    for it in a:
        doc = next(d for d in docs if d.startswith(it.context))
        assert doc[len(it.context):].startswith(it.continuations[it.gold])
        # the context ends where no BPE merges across: a letter or digit, then a space/newline/punctuation
        assert tasks._is_boundary(doc, len(it.context)) and len(it.context.encode()) >= 60
        assert len(it.context.encode()) <= 120 and len(set(it.continuations)) == 4
    assert tasks.continuation_items(docs[:3], n_choices=4) == []


def test_continuation_true_pairs_tokenize_as_their_parts(lm):
    # a cut inside a word lets only the true pair merge across it, and lm-eval's boundary rule then scores the
    # true span on fewer tokens (a random model "knew" the answer): the cut places rule that out
    docs = demo_docs(n=6, chars=3000) + demo_docs("code_python.jsonl.gz", "content", n=6, chars=3000)
    for group in (docs[:6], docs[6:]):
        items = tasks.continuation_items(group, n_choices=4, ctx_bytes=200, span_bytes=40, seed=1, per_doc=4)
        assert len(items) >= 12
        for it in items:
            _, conts = score.encode_item(lm, it.context, it.continuations)
            assert conts[it.gold] == lm.encode(it.continuations[it.gold])


def test_continuation_items_per_document_spread_and_never_overlap():
    docs = demo_docs(n=5, chars=3000)
    one = tasks.continuation_items(docs, n_choices=4, ctx_bytes=200, span_bytes=24, seed=3)
    many = tasks.continuation_items(docs, n_choices=4, ctx_bytes=200, span_bytes=24, seed=3, per_doc=6)
    assert len(one) == 5 and len(many) > 3 * len(one)
    assert many == tasks.continuation_items(docs, n_choices=4, ctx_bytes=200, span_bytes=24, seed=3, per_doc=6)
    where = {}
    for it in many:
        k = int(it.where.split("document ")[1].split(",")[0]) - 1
        at = docs[k].index(it.context + it.continuations[it.gold])  # context then its true span, in order
        where.setdefault(k, []).append((at, at + len(it.context) + len(it.continuations[it.gold])))
        assert all(any(c in d for m, d in enumerate(docs) if m != k)  # distractors: spans of other documents
                   for i, c in enumerate(it.continuations) if i != it.gold)
        assert len(set(it.continuations)) == 4
    for spans in where.values():  # the items of a document never overlap
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # offset-major: a cap takes every document's first item before any second one
    capped = tasks.continuation_items(docs, n_choices=4, ctx_bytes=200, span_bytes=24, seed=3, per_doc=6,
                                      max_items=5)
    assert sorted(int(it.where.split("document ")[1].split(",")[0]) for it in capped) == [1, 2, 3, 4, 5]


def test_mutual_info_subtracts_the_choice_alone(lm):
    item = Item("The cat sat on the", [" mat", " dog runs"], [" mat", " dog runs"], 0, "x")
    (un,) = score.unconditional_loglikelihoods(lm, [item])
    for choice, (got, _) in zip(item.continuations, un):  # log p(choice | <|endoftext|>), by a plain forward
        ids = [lm.prefix_id] + lm.encode(choice)
        with torch.inference_mode():
            logits, _ = lm.model(torch.tensor([ids]))
        want = logits[0, :-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).sum()
        assert got == pytest.approx(float(want), abs=1e-4)
    # the likelier choice under the context can lose to one the context lifts more; ties go to the first
    assert score.choose_mutual_info([-5.0, -4.0], [-1.0, -3.5]) == 1  # gains -4.0 and -0.5
    assert score.choose_mutual_info([-5.0, -4.0], [-4.0, -1.0]) == 0  # gains -1.0 and -3.0
    assert score.choose_mutual_info([-2.0, -2.0], [-1.0, -1.0]) == 0


def test_exact_match_through_the_chat_template(lm):
    from z2all.tokenizer.hf import CHAT_TEMPLATE

    lm.tok.chat_template = CHAT_TEMPLATE
    try:
        assert score.has_chat_template(lm)
        ids = score._prompt_ids(lm, "1+1=", chat=True)
        assert lm.tok.decode(ids) == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"
        out = score.exact_match(lm, [Item("1+1=", [], [], 0, "g", ["2"])], max_new_tokens=4, chat=True)
        assert out[0] is not None and out[0][1] is False
    finally:
        lm.tok.chat_template = None
