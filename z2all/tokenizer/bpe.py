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

Merging (`train`): every word's tokens sit in one flat, doubly linked list of positions (`_Text`);
`pair_counts[pair]` is the weighted number of adjacent occurrences; the index lists, per pair, the left
positions where it was created (never cleaned: a stale position no longer holds the pair and is skipped);
a heap holds (-count, pair) with lazy invalidation. A pair's count only falls, except when it is created
again (a merge whose token reuses an id), and then a fresh heap entry is pushed; so a popped entry whose
count is stale is pushed back with its current count, and the first fresh entry popped is the true
maximum. Each merge touches only the positions that hold the pair (see `train`).
"""

from __future__ import annotations

import gc
import heapq
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

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

# A merge visiting at least this many positions runs in numpy (`_Text.merge_vector`), a smaller one in a
# Python loop (`merge_scalar`): a numpy merge costs ~30 array calls (~0.1-0.3 ms here) whatever its size,
# the loop ~2-4 us per position; 64 had the fewest instructions of 32-128 (docs/performance.md).
VECTOR_MIN = 64


def train(word_counts: Iterable[tuple[bytes, int]], vocab_target: int, min_frequency: int = 1,
          progress=None, vector_min: int = VECTOR_MIN) -> BPEResult:
    """Incremental BPE over (word bytes, count) pairs; same result as `train_reference` (tested).
    `progress`, if given, is called with the number of new tokens after each learned token. `vector_min`:
    see VECTOR_MIN (tests set it to 0 and to infinity: both paths learn the same merges).

    A pair is one int code, id(a) << 21 | id(b); heap entries are (-count << 42) + code, one int that
    orders like the documented tie-break (heapq compares ints several times faster than tuples). The
    index of the pairs in the initial words comes from one numpy sort (`_Text.initial_pairs`); pairs
    created while merging are indexed by the merge that creates them, with the positions it wrote.

    Per merge of (a, b) -> z, an occurrence "x a b y" loses (x, a), (a, b), (b, y) and gains (x, z) and
    (z, y), weighted by its word's count. Both merge paths group the occurrences by neighbour: per distinct
    x one group moves its summed weight from (x, a) to (x, z), per distinct y one moves it from (b, y) to
    (z, y), and the (a, b) count is dropped; so the pair table, the heap and the index see one update per
    group rather than one per occurrence, and the merge applies them itself (`book`).

    Where the time goes, and what was tried and dropped: docs/performance.md ("BPE trainer")."""
    if vocab_target > 1 << 21:
        raise ValueError(f"vocab_target {vocab_target} exceeds 2**21: ids must fit the 21-bit halves of a pair code")
    vocab, index = _base_vocab()
    merges: list[tuple[int, int]] = []
    floor = max(1, min_frequency)
    t = _Text(word_counts)
    if t.n == 0:
        return BPEResult(vocab, merges)
    pair_counts, first_pos, first_at = t.initial_pairs(floor)
    heap = [(-c << 42) + code for code, c in pair_counts.items() if c >= floor]
    heapq.heapify(heap)
    # pair code -> the positions where merges created it (stale ones are skipped): one chunk (a list from
    # merge_scalar, an array from merge_vector) or a tuple of chunks
    where: dict[int, object] = {}
    book = (pair_counts, heap, where, floor)  # what a merge updates itself (see `merge_scalar`)
    get = pair_counts.get
    pop, replace = heapq.heappop, heapq.heapreplace
    M21, M42 = (1 << 21) - 1, (1 << 42) - 1

    # no cyclic GC while merging: the trainer's containers hold only ints and arrays (no cycles to find),
    # yet the ~100k lists and tuples it makes trigger collections that walk every tracked object of the
    # process, the growing index included (~1% of the instructions here, more in a bigger process)
    gc_on = gc.isenabled()
    gc.disable()
    try:
        while len(vocab) < vocab_target and heap:
            key = heap[0]
            code = key & M42
            cur = get(code, 0)
            if cur != -(key >> 42):  # stale: the count changed since this entry was pushed
                if cur >= floor:
                    replace(heap, (-cur << 42) + code)  # one sift instead of a pop and a push
                else:
                    pop(heap)
                continue
            if cur < floor:
                break
            pop(heap)
            a, b = code >> 21, code & M21
            before = len(vocab)
            z = _add_token(vocab, index, vocab[a] + vocab[b])
            merges.append((a, b))
            got = where.pop(code, ())
            parts = list(got) if type(got) is tuple else [got]
            span = first_at.pop(code, None)
            if span is not None:
                parts.append(first_pos[span[0]:span[1]])
            size = sum(map(len, parts))
            if size >= vector_min:
                t.merge_vector(parts, a, b, z, book)
            else:
                todo: list[int] = []
                for p in parts:
                    todo += p if isinstance(p, list) else p.tolist()
                t.merge_scalar(todo, a, b, z, book)
            pair_counts.pop(code, None)
            if progress is not None and len(vocab) > before:
                progress(len(vocab) - before)
    finally:
        if gc_on:
            gc.enable()
    return BPEResult(vocab, merges)


class _Text:
    """Every word's tokens in one doubly linked list over flat numpy arrays (position k: token tok[k],
    neighbours nxt[k] / prv[k] inside its word, the word's count weight[k]); `end` is a sentinel
    position (token -1) meaning "no neighbour". Merging writes z at the left position and unlinks the
    right one, so a position never moves and the index can hold positions."""

    def __init__(self, word_counts: Iterable[tuple[bytes, int]]):
        raw: list[bytes] = []
        counts: list[int] = []
        for w, c in word_counts:
            if len(w) > 1:
                raw.append(w)
                counts.append(c)
        self.n = n = len(raw)
        if not n:
            return
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=n)
        N = int(lens.sum())
        if N + 1 >= 2**31:
            raise ValueError(f"{N} tokens in the word table: more than 32-bit positions hold")
        self.end = end = N
        self.tok = tok = np.empty(N + 1, dtype=np.int32)
        tok[:N] = np.asarray(byte_to_id(), dtype=np.int32)[np.frombuffer(b"".join(raw), dtype=np.uint8)]
        tok[N] = -1
        del raw
        stops = np.cumsum(lens)
        self.nxt = nxt = np.arange(1, N + 2, dtype=np.int32)
        nxt[stops - 1] = end
        nxt[N] = end
        self.prv = prv = np.arange(-1, N, dtype=np.int32)
        prv[stops - lens] = end
        prv[N] = end
        # 4-byte counts unless a word occurs 2**31 times; sums are taken in int64 (reduceat dtype=)
        counts = np.asarray(counts, dtype=np.int64)
        self.weight = np.zeros(N + 1, dtype=np.int32 if counts.max() < 2**31 else np.int64)
        self.weight[:N] = np.repeat(counts, lens)
        self.mark = np.zeros(N + 1, dtype=bool)  # scratch: only mark[end] is set between calls
        self.mark[end] = True  # so `~mark[L]` also drops L == end (no left neighbour)
        # memoryviews of the same arrays: element access as Python ints, for the scalar path
        self.tv, self.nv, self.pv, self.wv = map(memoryview, (tok, nxt, prv, self.weight))

    def initial_pairs(self, floor: int):
        """(pair code -> weighted count for every pair, positions, {code: (lo, hi)}) where positions[lo:hi]
        are the left positions of a pair counted at least `floor` times (the others can never be merged:
        no merge creates a pair of two bytes). Byte ids are < 256, so a 16-bit code sorts by radix."""
        tok, nxt, end = self.tok, self.nxt, self.end
        pos = np.flatnonzero(nxt[:end] != end).astype(np.int32)
        c16 = ((tok[pos] << 8) | tok[nxt[pos]]).astype(np.uint16)
        order = np.argsort(c16, kind="stable")
        pos, c16 = pos[order], c16[order]
        del order
        starts = _run_starts(c16)
        totals = np.add.reduceat(self.weight[pos], starts, dtype=np.int64).tolist()
        head = c16[starts].astype(np.int64)
        codes = (((head >> 8) << 21) | (head & 255)).tolist()
        bounds = starts.tolist() + [len(pos)]
        first_at = {c: (bounds[i], bounds[i + 1]) for i, (c, t) in enumerate(zip(codes, totals)) if t >= floor}
        return dict(zip(codes, totals)), pos, first_at

    def merge_scalar(self, todo: list[int], a: int, b: int, z: int, book: tuple):
        """Merge (a, b) -> z at the positions in `todo` (stale ones skipped), one at a time on the live
        lists, which is what makes touching occurrences ("a b a b", "a a a") come out right: the second
        sees the first's z as its left neighbour. Occurrences are grouped by their neighbour tokens x and
        y ("x a b y" -> "x z y"), and each group updates `book` = (pair counts, heap, index, floor) once:
        its summed weight moves from (x, a) to (x, z) or from (b, y) to (z, y)."""
        tv, nv, pv, end = self.tv, self.nv, self.pv, self.end
        if a == b:
            todo.sort()  # left to right: in "a a a" the first two merge
        left: dict[int, list[int]] = {}  # x -> positions of x in "x z" pairs made here
        right: dict[int, list[int]] = {}  # y -> positions of z in "z y"
        lget, rget = left.get, right.get
        for k in todo:
            if tv[k] != a:
                continue
            r = nv[k]
            if tv[r] != b:
                continue
            l = pv[k]
            if l != end:
                x = tv[l]
                lst = lget(x)
                if lst is None:
                    left[x] = [l]
                else:
                    lst.append(l)
            q = nv[r]
            if q != end:
                y = tv[q]
                lst = rget(y)
                if lst is None:
                    right[y] = [k]
                else:
                    lst.append(k)
                pv[q] = k
            tv[k] = z
            tv[r] = -1
            nv[k] = q
        # a pair met twice here (the "z z" of touching occurrences) is pushed with each rising count (lazy heap)
        wget = self.wv.__getitem__
        for x, lst in left.items():  # (x, a) became (x, z)
            w = wget(lst[0]) if len(lst) == 1 else sum(map(wget, lst))
            _move(book, (x << 21) | a, (x << 21) | z, w, lst)
        for y, lst in right.items():  # (b, y) became (z, y)
            w = wget(lst[0]) if len(lst) == 1 else sum(map(wget, lst))
            _move(book, (b << 21) | y, (z << 21) | y, w, lst)

    def merge_vector(self, parts: list, a: int, b: int, z: int, book: tuple):
        """`merge_scalar` in numpy, for merges with many positions (same result, tested)."""
        tok, nxt, prv, weight, mark, end = self.tok, self.nxt, self.prv, self.weight, self.mark, self.end
        K = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        R = nxt[K]
        live = (tok[K] == a) & (tok[R] == b)
        K, R = K[live], R[live]
        if a == b and len(K) > 1:  # touching occurrences in "a a a": keep the 1st, 3rd, ... of each run
            order = K.argsort()
            K, R = K[order], R[order]
            follows = np.zeros(len(K), dtype=bool)
            follows[1:] = K[1:] == R[:-1]
            if follows.any():
                i = np.arange(len(K))
                run_start = np.maximum.accumulate(np.where(follows, 0, i))
                keep = (i - run_start) % 2 == 0
                K, R = K[keep], R[keep]
        L, Q = prv[K], nxt[R]
        has_y = Q != end
        Y, KY = Q[has_y], K[has_y]
        # left neighbours x, except where occurrences touch ("a b a b"): the (b, a) between them is the first
        # one's (b, y), so it is counted on the right only, and becomes its (z, z)
        mark[R] = True
        X = L[~mark[L]]
        mark[R] = False
        y_before = tok[Y]
        tok[K] = z
        tok[R] = -1
        nxt[K] = Q
        prv[Q] = K
        # as in merge_scalar: per left neighbour x, (x, a) became (x, z) at X; per right neighbour, (b, y)
        # became (z, y') at K, where y' is y or, where occurrences touch, z. The lost (a, b) itself is left
        # out: `train` drops that pair. The index entries are compact copies (pos[order]), one view per pair.
        yy = (y_before.astype(np.int64) << 21) | tok[Y]
        M21 = (1 << 21) - 1
        for keys, pos, left in ((tok[X], X, True), (yy, KY, False)):
            if not len(pos):
                continue
            order = keys.argsort()  # methods, not np.argsort: the Python-level wrappers cost ~10-40 us a call
            keys, pos = keys[order], pos[order].astype(np.int32, copy=False)  # K is int64 if a part was a list
            starts = _run_starts(keys)
            sums = np.add.reduceat(weight[pos], starts, dtype=np.int64).tolist()
            bounds = starts.tolist() + [len(pos)]
            for key, w, lo, hi in zip(keys[starts].tolist(), sums, bounds, bounds[1:]):
                if left:
                    _move(book, (key << 21) | a, (key << 21) | z, w, pos[lo:hi])
                else:
                    _move(book, (b << 21) | (key >> 21), (z << 21) | (key & M21), w, pos[lo:hi])


def _move(book: tuple, lost: int, made: int, w: int, chunk) -> None:
    """One neighbour group's update of `book` = (pair counts, heap, index, floor): weight w moves from pair
    `lost` to pair `made`, which the merge created at the left positions `chunk` (a list or an int32 array;
    a pair's index entry is one chunk, or a tuple of them: a wrapping list per pair cost 64 B). The call
    per group costs ~2% of `train`'s instructions against writing this out in each caller (see `train`)."""
    counts, heap, where, floor = book
    counts[lost] = counts.get(lost, 0) - w
    n = counts.get(made, 0) + w
    counts[made] = n
    if n >= floor:  # a count only rises where a merge creates the pair: push it (stale entries are lazy)
        heapq.heappush(heap, (-n << 42) + made)
    old = where.get(made)
    if old is None:
        where[made] = chunk
    else:
        where[made] = old + (chunk,) if type(old) is tuple else (old, chunk)


def _run_starts(sorted_codes: np.ndarray) -> np.ndarray:
    """Indices where a new value starts in a sorted array (np.diff with prepend costs ~50 us a call here)."""
    new = np.empty(len(sorted_codes), dtype=bool)
    new[:1] = True
    np.not_equal(sorted_codes[1:], sorted_codes[:-1], out=new[1:])
    return new.nonzero()[0]


# ------------------------------------------------------------------ bounded-memory word counting

# Memory model for `--memory-budget`: BASE_BYTES + workers * WORKER_BYTES + capacity * BYTES_PER_WORD.
# Measured (VmHWM of `z2all tokenizer train`, 1 worker, vocab 8192, 1/3/9 MB of the shared zh/en/code
# corpora = 30k/55k/109k distinct words): 70 / 94 / 119 MB, i.e. ~50 MB (interpreter, imports, a counting
# batch) + ~620 B per distinct word (its count-table entry, then its tokens in the trainer's position
# arrays, ~21 B a token, the pair table and the pair -> positions index while merging). A counting worker
# peaked at 33 MB. The constants add ~25% to each. Between prunes the table can exceed `capacity` by one
# batch's new words (a 1 MB batch has well under 100k), covered by BASE_BYTES.
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
    Returns (word -> count, stats). `workers` > 1 runs the regex in that many forked processes; the parent
    only reads and merges (the parent counting too gained nothing: docs/performance.md)."""
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
