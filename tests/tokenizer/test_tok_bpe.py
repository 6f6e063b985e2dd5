"""The fast trainer learns exactly the reference trainer's and HF BpeTrainer's merges; the Rust encoder
built from our files encodes like the reference encoder; lossy counting keeps its error bound."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from z2all.tokenizer import bpe, hf
from z2all.tokenizer.pretokenize import split_pattern, token_str


def word_counts(texts, pattern=None) -> dict[bytes, int]:
    c: Counter = Counter()
    for t in texts:
        c.update(bpe.compile_pattern(pattern or split_pattern()).findall(t))
    return {w.encode(): n for w, n in c.items()}


# the fast trainer merges in numpy when a merge visits >= vector_min positions, else in a Python loop:
# 0 and "never" force one path for every merge, the default mixes them
PATHS = pytest.mark.parametrize("vector_min", [0, 10**9, bpe.VECTOR_MIN], ids=["numpy", "loop", "mixed"])


@PATHS
def test_fast_equals_reference_on_tricky_words(vector_min):
    # repeated letters (overlapping pairs), alternations, a spelling reachable by two merge orders, Han, emoji
    wc = {b"aaaaaaa": 5, b"abababab": 3, b"abcabc": 4, b"bcab": 2, b"cab": 7, b" the": 9, b"the": 4,
          "中文中文".encode(): 3, "😀😀".encode(): 2, b"ab": 1}
    ref = bpe.train_reference(wc, 256 + 40)
    fast = bpe.train(wc.items(), 256 + 40, vector_min=vector_min)
    assert fast.merges == ref.merges and fast.vocab == ref.vocab
    assert len(fast.merges) > 20


def all_docs(take, per_file_chars: int) -> list[str]:
    return [t for docs in take(per_file_chars).values() for t in docs]


@PATHS
def test_fast_equals_reference_on_real_text(demo_docs, vector_min):
    wc = word_counts(all_docs(demo_docs, 4_000))
    ref = bpe.train_reference(wc, 256 + 60, min_frequency=2)
    fast = bpe.train(wc.items(), 256 + 60, min_frequency=2, vector_min=vector_min)
    assert fast.merges == ref.merges and len(fast.merges) == 60


def test_fast_matches_hf_bpetrainer_merges(demo_docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    docs = all_docs(demo_docs, 60_000)
    pattern = split_pattern()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(pattern)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1024, min_frequency=2, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    import json

    hf_merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    counts, _ = bpe.count_words(docs, pattern, capacity=10**9)
    ours = bpe.train(((w.encode(), c) for w, c in counts.items()), 1024, min_frequency=2)
    assert [(token_str(a), token_str(b)) for a, b in ours.merge_strings()] == hf_merges
    assert len(hf_merges) >= 1024 - 256


def test_rust_encoder_matches_reference_encoder(demo_docs):
    docs = all_docs(demo_docs, 30_000)
    train, held = docs[::2], docs[1::2]
    pattern = split_pattern()
    result = bpe.train(word_counts(train).items(), 256 + 300, min_frequency=2)
    tok = hf.tokenizer_from_bpe(result.vocab, result.merges, pattern)
    for text in held[:40]:
        text = text[:3000]
        assert tok.encode(text).ids == bpe.encode_reference(text, result, pattern)
        assert tok.decode(tok.encode(text).ids) == text


def test_lossy_counter_error_bound():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    weights = [1 / (i + 1) for i in range(5000)]  # Zipf
    truth: Counter = Counter()
    table = bpe.LossyCounter(capacity=400)
    for _ in range(60):
        batch = Counter(rng.choices(vocab, weights, k=500))
        truth.update(batch)
        table.add(batch)
        assert len(table.counts) <= 400
    F = table.floor
    assert table.prunes > 0 and F > 0
    for w, n in truth.items():
        est = table.counts.get(w)
        if est is None:
            assert n <= F  # a dropped word was rare
        else:
            assert est <= n <= est + F  # a kept word is low by at most F
    top = [w for w, _ in truth.most_common(20)]
    assert all(w in table.counts for w in top)


def test_parallel_counting_equals_serial_and_prunes_under_small_capacity(demo_docs):
    docs = all_docs(demo_docs, 40_000)
    pattern = split_pattern()
    one, s1 = bpe.count_words(docs, pattern, capacity=10**9, workers=1)
    two, s2 = bpe.count_words(docs, pattern, capacity=10**9, workers=2)
    assert one == two and s1.words_total == s2.words_total and s1.error_bound == 0
    small, s3 = bpe.count_words(docs, pattern, capacity=500, workers=1)
    assert s3.prunes > 0 and s3.error_bound > 0 and len(small) <= 500
    small2, s4 = bpe.count_words(docs, pattern, capacity=500, workers=2)  # batches added in input order
    assert small2 == small and s4.error_bound == s3.error_bound
    for w, c in small.items():
        assert c <= one[w] <= c + s3.error_bound


def test_min_frequency_stops_training():
    wc = {b"abcd": 3, b"xy": 1}
    res = bpe.train(wc.items(), 1000, min_frequency=2)
    assert len(res.merges) == 3 and len(res.vocab) == 259


@PATHS
def test_fast_equals_reference_on_random_small_vocabularies(vector_min):
    rng = random.Random(7)
    for _ in range(150):
        wc = {}
        for _ in range(rng.randint(2, 8)):
            word = "".join(rng.choice("aab c中") for _ in range(rng.randint(1, 10))).encode()
            wc[word] = rng.randint(1, 9)
        target = 256 + rng.randint(1, 25)
        min_frequency = rng.choice([1, 2])
        ref = bpe.train_reference(wc, target, min_frequency=min_frequency)
        fast = bpe.train(wc.items(), target, min_frequency=min_frequency, vector_min=vector_min)
        assert fast.merges == ref.merges and fast.vocab == ref.vocab
