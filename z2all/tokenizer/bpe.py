"""Byte-level BPE: a readable reference trainer and encoder, the fast trainer, and bounded-memory word counting.

Token ids: 0..255 are the 256 bytes in `pretokenize.byte_order()` (GPT-2's layout: '!' is 0), then each
merge result in the order it was learned. Two different merges can spell the same bytes ((ab)c and a(bc));
the second one reuses the first one's id, exactly as HF's BpeTrainer does, so `len(merges)` can exceed
the number of learned tokens. Training stops when the base vocabulary (bytes + learned tokens) reaches
`vocab_target`, or when no pair occurs `min_frequency` times.

Tie-breaking (documented, and the same as HF tokenizers' BpeTrainer): the pair with the highest count wins;
among equal counts the pair (a, b) with the smallest (id(a), id(b)) wins. Because our byte ids follow the
code-point order of the byte-level alphabet (HF's initial-alphabet order) and learned ids are appended in
creation order (as HF does), both trainers pick the same pair at every step; tests check the merge lists
are identical.

Counting (`count_words`): texts are cut by the split pattern in worker processes (`regex.findall` over
~1 MB batches, `collections.Counter`), and the parent merges the batch counts into one table of at most
`capacity` words. When the table is full it is pruned lossy-counting style (Manku & Motwani): each entry
keeps `delta`, the most it may have been undercounted when it (re)entered the table; pruning raises a
floor F and drops entries with count + delta <= F. Every kept count is then low by at most F, and a
dropped word occurred at most F times before it was dropped; F is reported as the error bound.

Merging (`train`): words are strings of token characters with a count; `pair_counts[pair]` is the
weighted number of adjacent occurrences; `where[pair]` lists the words that contain it (never cleaned: a
stale entry is a word that no longer contains the pair, and merging it changes nothing); a heap holds
(-count, pair) with lazy invalidation. A pair's count can only fall after the pair is first created
(merges only create pairs that contain the new token), so a popped entry whose count is stale is pushed
back with its current count and the first fresh entry popped is the true maximum. Each merge touches only
the words that contain the pair (see `train` for how it batches the count updates).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import add

from z2all.tokenizer.pretokenize import byte_order, byte_to_id, compile_pattern


@dataclass
class BPEResult:
    """`vocab[i]` is the byte string of token i (0..255 are single bytes); `merges` are (left id, right id)
    in learning order, each producing the token whose bytes are vocab[left] + vocab[right]."""

    vocab: list[bytes]
    merges: list[tuple[int, int]]

    def merge_strings(self) -> list[tuple[bytes, bytes]]:
        return [(self.vocab[a], self.vocab[b]) for a, b in self.merges]


def _base_vocab() -> tuple[list[bytes], dict[bytes, int]]:
    vocab = [bytes([b]) for b in byte_order()]
    return vocab, {t: i for i, t in enumerate(vocab)}


def _add_token(vocab: list[bytes], index: dict[bytes, int], data: bytes) -> int:
    tid = index.get(data)
    if tid is None:
        tid = len(vocab)
        vocab.append(data)
        index[data] = tid
    return tid


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b) in `word`, scanning left to right."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


# ------------------------------------------------------------------ the reference trainer and encoder

def train_reference(word_counts: dict[bytes, int], vocab_target: int, min_frequency: int = 1) -> BPEResult:
    """The textbook algorithm, recounting every pair of every word at each step: O(merges x corpus).
    Small inputs only; it is the spec the fast trainer is tested against."""
    vocab, index = _base_vocab()
    b2i = byte_to_id()
    words = [[b2i[x] for x in w] for w in word_counts]
    counts = list(word_counts.values())
    merges: list[tuple[int, int]] = []
    while len(vocab) < vocab_target:
        stats: Counter = Counter()
        for w, c in zip(words, counts):
            for pair in zip(w, w[1:]):
                stats[pair] += c
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))  # highest count, then smallest ids
        if stats[best] < max(1, min_frequency):
            break
        new = _add_token(vocab, index, vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        words = [_merge_word(w, best[0], best[1], new) for w in words]
    return BPEResult(vocab, merges)


def encode_reference(text: str, result: BPEResult, pattern: str) -> list[int]:
    """Encode by the definition: split with the pattern, then in each piece apply the lowest-ranked merge
    present until none applies. Used by tests to check the Rust encoder built from our files."""
    b2i = byte_to_id()
    ranks = {}
    for r, (a, b) in enumerate(result.merges):
        ranks.setdefault((a, b), r)
    index = {t: i for i, t in enumerate(result.vocab)}
    ids: list[int] = []
    for piece in compile_pattern(pattern).findall(text):
        word = [b2i[x] for x in piece.encode("utf-8")]
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            a, b = pair
            word = _merge_word(word, a, b, index[result.vocab[a] + result.vocab[b]])
        ids.extend(word)
    return ids


# ------------------------------------------------------------------ the fast trainer

def train(word_counts: Iterable[tuple[bytes, int]], vocab_target: int, min_frequency: int = 1,
          progress=None) -> BPEResult:
    """Incremental BPE over (word bytes, count) pairs; same result as `train_reference` (tested).
    `progress`, if given, is called with the number of new tokens after each learned token.

    A word is held as a str with one character per token (chr(id)): merging a pair is `str.replace` of a
    2-character string, which is exactly the left-to-right non-overlapping rule and runs in C, and a word
    of byte-ids takes 1-2 bytes per token instead of 8 (+ int objects) in a list. Pairs are 2-character
    strings (dict keys); heap entries encode (-count, id(a), id(b)) in one int so they order like the
    documented tie-break.

    Per merge of (a, b) -> z, a word with one occurrence "x a b y" only loses (x, a) and (b, y) and gains
    (x, z) and (z, y), all weighted by its count; the words are grouped by the pair they gain and each
    group's count change is applied once, so the big pair table and the heap see one update per distinct
    neighbour rather than one per word, and a group's word list is exactly where[(x, z)]. Words with
    several occurrences, and every word when z reuses an existing id (pairs with z may already exist),
    are recounted whole. CPU seconds at vocab 8192 on the shared corpora (interleaved A/B, 2-core shared machine)
    against the previous version (per-occurrence updates, (-count, pair) tuples in the heap): 1 MB / 30k
    distinct words 1.2-1.4 vs 2.0; 3 MB / 55k 2.3 vs 3.0; 9 MB / 109k (673k word rewrites) 4.0-4.6 vs
    5.8-6.8. Most of what is left is per rewritten word (find, replace, neighbour grouping) and the initial
    pair count (~20%)."""
    if vocab_target > 0x110000:
        raise ValueError(f"vocab_target {vocab_target} exceeds what one character per token can hold")
    vocab, index = _base_vocab()
    to_chars = {b: chr(i) for b, i in enumerate(byte_to_id())}  # latin-1 char of byte b -> char of its id
    words: list[str] = []
    counts: list[int] = []
    for w, c in word_counts:
        if len(w) > 1:
            words.append(w.decode("latin-1").translate(to_chars))
            counts.append(c)

    pair_counts: dict[str, int] = {}
    where: dict[str, list[int]] = {}  # pair -> indices of the words holding it (and stale ones: skipped)
    get = pair_counts.get
    for wi, s in enumerate(words):
        c = counts[wi]
        for p in map(add, s, s[1:]):
            pair_counts[p] = get(p, 0) + c
            lst = where.get(p)
            if lst is None:
                where[p] = [wi]
            elif lst[-1] != wi:
                lst.append(wi)
    # a heap entry is one int, (-count << 42) + (id(a) << 21) + id(b) (ids < 2**21): heapq compares ints
    # several times faster than (-count, pair) tuples, and the order is the same
    heap = [(-c << 42) + (ord(p[0]) << 21) + ord(p[1]) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    floor = max(1, min_frequency)
    merges: list[tuple[int, int]] = []
    push, pop = heapq.heappush, heapq.heappop
    M21, M42 = (1 << 21) - 1, (1 << 42) - 1
    cget = counts.__getitem__

    while len(vocab) < vocab_target and heap:
        key = pop(heap)
        a, b = (key >> 21) & M21, key & M21
        ca, cb = chr(a), chr(b)
        ab = ca + cb
        cur = get(ab, 0)
        if cur != -(key >> 42):  # stale: the count changed since this entry was pushed
            if cur >= floor:
                push(heap, (-cur << 42) + (key & M42))
            continue
        if cur < floor:
            break
        before = len(vocab)
        zid = _add_token(vocab, index, vocab[a] + vocab[b])
        fresh = len(vocab) > before  # a reused id may already sit in words: recount those fully
        z = chr(zid)
        merges.append((a, b))
        made: dict[str, list[int]] = {}  # (x, z) or (z, y) -> words where "x a b y" became "x z y" (one a b)
        mget = made.get
        other: dict[str, list[int]] = {}  # pair with z -> words recounted whole
        for wi in where.pop(ab, ()):
            s = words[wi]
            i = s.find(ab)
            if i < 0:  # stale index entry
                continue
            t = s.replace(ab, z)
            words[wi] = t
            n = len(s)
            if fresh and len(t) == n - 1:
                if i:
                    p = s[i - 1] + z
                    lst = mget(p)
                    if lst is None:
                        made[p] = [wi]
                    else:
                        lst.append(wi)
                if i + 2 < n:
                    p = z + s[i + 2]
                    lst = mget(p)
                    if lst is None:
                        made[p] = [wi]
                    else:
                        lst.append(wi)
            else:
                c = counts[wi]
                for p in map(add, s, s[1:]):
                    pair_counts[p] -= c
                for p in set(map(add, t, t[1:])):
                    if z in p:
                        other.setdefault(p, []).append(wi)
                for p in map(add, t, t[1:]):
                    pair_counts[p] = get(p, 0) + c
        for p, lst in made.items():  # fresh z: (x, z) replaced (x, a), (z, y) replaced (b, y)
            c = sum(map(cget, lst))
            pair_counts[p[0] + ca if p[1] == z else cb + p[1]] -= c
            pair_counts[p] = get(p, 0) + c
        pair_counts.pop(ab, None)  # only now: (b, y) above can be (a, b) itself, as in "aaa"
        for p, lst in other.items():
            more = mget(p)
            made[p] = lst if more is None else more + lst
        for p, lst in made.items():  # every pair here holds z; below the floor it can never reach it
            old = where.get(p)
            where[p] = lst if old is None else old + lst
            c = pair_counts[p]
            if c >= floor:
                push(heap, (-c << 42) + (ord(p[0]) << 21) + ord(p[1]))
        if progress is not None and len(vocab) > before:
            progress(len(vocab) - before)
    return BPEResult(vocab, merges)


# ------------------------------------------------------------------ bounded-memory word counting

# Memory model for `--memory-budget`: BASE_BYTES + workers * WORKER_BYTES + capacity * BYTES_PER_WORD.
# Measured (VmHWM of `z2all tokenizer train`, 1 worker, vocab 8192, 1/3/9 MB of the shared zh/en/code
# corpora = 30k/55k/109k distinct words): peak = 25 MB interpreter + ~45 MB fixed + ~640 B per distinct
# word (its count-table entry, then its token string, pair counts and pair->words index entries while
# merging); a counting worker peaked at 33 MB. The constants add ~25% to each. Between prunes the table can
# exceed `capacity` by one batch's new words (a 1 MB batch has well under 100k), covered by BASE_BYTES.
BYTES_PER_WORD = 800
BASE_BYTES = 96 * 2**20
WORKER_BYTES = 40 * 2**20
# Counting batches grow with the text seen so far, ~1/(4 x workers) of it, from MIN_BATCH_CHARS up to
# BATCH_CHARS: a small corpus still splits into enough batches to keep every worker busy to the end (with a
# fixed 1 MB, 1 MB of text was one batch on one worker and 3 MB left one worker idle for a third of the
# time), a large one gets 1 MB batches so the parent merges few count tables (each batch's distinct words
# are pickled back and added to the table by the parent alone).
BATCH_CHARS = 1 << 20
MIN_BATCH_CHARS = 1 << 16
# Below this many distinct words the table cannot even hold the byte alphabet's common pairs usefully.
MIN_WORDS = 4096


@dataclass
class CountStats:
    """What counting saw and what the memory bound cost (`error_bound`: max undercount of any word)."""

    docs: int = 0
    chars: int = 0
    words_total: int = 0
    unique_kept: int = 0
    capacity: int = 0
    prunes: int = 0
    pruned_entries: int = 0
    error_bound: int = 0
    workers: int = 1
    notes: list[str] = field(default_factory=list)


class LossyCounter:
    """A word -> count table of at most `capacity` entries (after each `add`), pruned by lossy counting."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.counts: dict[str, int] = {}
        self.deltas: dict[str, int] = {}  # only for words that entered after a prune
        self.floor = 0
        self.prunes = 0
        self.pruned_entries = 0

    def add(self, batch: dict[str, int]) -> None:
        counts, get = self.counts, self.counts.get
        if self.floor == 0:
            for w, c in batch.items():
                counts[w] = get(w, 0) + c
        else:
            deltas, floor = self.deltas, self.floor
            for w, c in batch.items():
                old = get(w)
                if old is None:
                    counts[w] = c
                    deltas[w] = floor
                else:
                    counts[w] = old + c
        if len(counts) > self.capacity:
            self._prune()

    def _prune(self) -> None:
        """Raise the floor until at most half the capacity remains (ties may drop more)."""
        counts, deltas = self.counts, self.deltas
        keep = self.capacity // 2
        dget = deltas.get
        upper = sorted((c + dget(w, 0) for w, c in counts.items()), reverse=True)
        new_floor = upper[keep] if keep < len(upper) else 0
        self.floor = max(self.floor, new_floor)
        floor = self.floor
        drop = [w for w, c in counts.items() if c + dget(w, 0) <= floor]
        for w in drop:
            del counts[w]
            deltas.pop(w, None)
        self.prunes += 1
        self.pruned_entries += len(drop)


def _count_batch(args: tuple[list[str], str]) -> tuple[dict[str, int], int]:
    texts, pattern = args
    findall = compile_pattern(pattern).findall
    c: Counter = Counter()
    n = 0
    for t in texts:
        pieces = findall(t)
        n += len(pieces)
        c.update(pieces)
    return c, n


def _batches(texts: Iterable[str], stats: CountStats, workers: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    target = MIN_BATCH_CHARS
    for t in texts:
        if not t:
            continue
        stats.docs += 1
        stats.chars += len(t)
        batch.append(t)
        size += len(t)
        if size >= target:
            yield batch
            batch, size = [], 0
            target = min(BATCH_CHARS, max(MIN_BATCH_CHARS, stats.chars // (4 * workers)))
    if batch:
        yield batch


def capacity_for_budget(budget_bytes: int, workers: int) -> int:
    """How many distinct words fit in `budget_bytes` with `workers` counting processes."""
    free = budget_bytes - BASE_BYTES - workers * WORKER_BYTES
    return max(0, free // BYTES_PER_WORD)


def count_words(texts: Iterable[str], pattern: str, capacity: int, workers: int = 1,
                progress=None) -> tuple[dict[str, int], CountStats]:
    """Count the pieces of `texts` under the split pattern, keeping at most `capacity` distinct words.
    Returns (word -> count, stats). `workers` > 1 runs the regex in that many forked processes."""
    stats = CountStats(capacity=capacity, workers=workers)
    table = LossyCounter(capacity)
    jobs = ((b, pattern) for b in _batches(texts, stats, workers))
    if workers > 1 and "fork" in mp.get_all_start_methods():
        ctx = mp.get_context("fork")  # workers need nothing but the regex; fork starts them in ms
        with ctx.Pool(workers) as pool:
            # imap, not imap_unordered: a worker still takes the next batch as soon as it is free, and the
            # table sees the batches in input order, so a run that prunes keeps the same words for any
            # number of workers (tested) and twice in a row
            for counts, n in pool.imap(_count_batch, jobs, chunksize=1):
                table.add(counts)
                stats.words_total += n
                if progress is not None:
                    progress(n)
    else:
        stats.workers = 1
        for job in jobs:
            counts, n = _count_batch(job)
            table.add(counts)
            stats.words_total += n
            if progress is not None:
                progress(n)
    stats.unique_kept = len(table.counts)
    stats.prunes = table.prunes
    stats.pruned_entries = table.pruned_entries
    stats.error_bound = table.floor
    return table.counts, stats


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
