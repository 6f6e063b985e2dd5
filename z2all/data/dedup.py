"""Deduplication state: `HashSet64` (a compact set of 64-bit content hashes) and `MinHash` near-duplicate
keys.

`HashSet64` keeps 64-bit hashes in a sorted NumPy array plus a pending Python set (at most 2**18
entries, ~17 MB) merged in with one O(n) insert when full: 8 bytes per kept document (10 M documents =
80 MB, 2x during a merge), never the text. Exact dedup keys on `content_hash` (SHA-256 of the cleaned content,
64 bits kept, clean.content_hash). `MinHash` (optional) finds near duplicates with character 5-gram MinHash
and LSH banding: 128 permutations in 16 bands of 8 rows flag pairs above Jaccard similarity ~0.7
((1/16)**(1/8)) with high probability; it costs O(characters x permutations) of NumPy work per document (see
`z2all bench data` for the measured slowdown) and 16 more hashes (128 B) per document in memory.
"""

from __future__ import annotations

import hashlib

import numpy as np


class HashSet64:
    """A set of 64-bit integers at ~8 bytes each: sorted uint64 array + a pending set merged every `flush`."""

    def __init__(self, flush: int = 1 << 18):
        self.base = np.empty(0, dtype=np.uint64)
        self.pending: set[int] = set()
        self.flush = flush  # 2**18 pending ints ~ 17 MB of Python set; merging is one O(n) np.insert

    def __len__(self) -> int:
        return len(self.base) + len(self.pending)

    def _in_base(self, values: np.ndarray) -> np.ndarray:
        if not len(self.base):
            return np.zeros(len(values), dtype=bool)
        pos = np.searchsorted(self.base, values).clip(max=len(self.base) - 1)
        return self.base[pos] == values

    def add_new(self, values) -> list[bool]:
        """For each value in order: True if it was not in the set (and add it), False if seen before
        (including earlier in the same call)."""
        arr = np.asarray(values, dtype=np.uint64)
        if not len(arr):
            return []
        # NumPy for the sorted base and for repeats inside the call (np.unique gives first occurrences),
        # the pending set only for what is left, through C-level map/update: a per-value Python loop cost
        # ~0.5 us a document in the converter's parent, its serial share with --workers N
        keep = ~self._in_base(arr)
        first = np.zeros(len(arr), dtype=bool)
        first[np.unique(arr, return_index=True)[1]] = True
        keep &= first
        idx = np.flatnonzero(keep)
        cand = arr[idx].tolist()
        hit = list(map(self.pending.__contains__, cand))
        if any(hit):
            keep[idx[np.asarray(hit)]] = False
            cand = [v for v, h in zip(cand, hit) if not h]
        self.pending.update(cand)
        if len(self.pending) >= self.flush:
            self.merge()
        return keep.tolist()

    def add_all(self, values) -> None:
        self._insert(np.asarray(values, dtype=np.uint64))

    def merge(self) -> None:
        if self.pending:
            self._insert(np.fromiter(self.pending, dtype=np.uint64, count=len(self.pending)))
            self.pending = set()

    def _insert(self, arr: np.ndarray) -> None:
        arr = np.unique(arr)
        if len(self.base):
            arr = arr[~self._in_base(arr)]
        self.base = np.insert(self.base, np.searchsorted(self.base, arr), arr)  # O(n + m), stays sorted

    def values(self) -> np.ndarray:
        self.merge()
        return self.base


_MERSENNE = np.uint64((1 << 61) - 1)


class MinHash:
    """Character 5-gram MinHash signatures and their LSH band keys (computed in the workers)."""

    def __init__(self, perms: int = 128, bands: int = 16, shingle: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        # 31-bit multipliers keep (a * h) below 2**62 for 31-bit shingle hashes: exact in uint64
        self.a = rng.integers(1, 1 << 31, size=perms, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=perms, dtype=np.uint64)
        self.perms, self.bands, self.shingle = perms, bands, shingle

    def shingles(self, text: str) -> np.ndarray:
        """31-bit hashes of every character n-gram (lower-cased, whitespace dropped), vectorised."""
        s = "".join(text.lower().split())
        cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = self.shingle
        if len(cps) < n:
            cps = np.concatenate([cps, np.zeros(n - len(cps), dtype=np.uint64)])
        h = np.zeros(len(cps) - n + 1, dtype=np.uint64)
        for j in range(n):  # polynomial rolling hash, wrapping mod 2**64
            h = h * np.uint64(1_000_003) + cps[j: len(cps) - n + 1 + j]
        return np.unique(h & np.uint64(0x7FFFFFFF))

    def band_keys(self, text: str) -> list[int]:
        sh = self.shingles(text)
        sig = np.empty(self.perms, dtype=np.uint64)
        for i in range(0, self.perms, 32):  # 32 permutations at a time bounds the [32, shingles] temporary
            a, b = self.a[i: i + 32, None], self.b[i: i + 32, None]
            sig[i: i + 32] = ((a * sh[None, :] + b) % _MERSENNE).min(axis=1)
        rows = self.perms // self.bands
        keys = []
        for band in range(self.bands):
            digest = hashlib.blake2b(sig[band * rows: (band + 1) * rows].tobytes(), digest_size=8,
                                     person=band.to_bytes(2, "little")).digest()
            keys.append(int.from_bytes(digest, "little"))
        return keys
