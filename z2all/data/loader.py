"""Memory-mapped token dataset for training: (x, y) windows of seq_len+1 tokens, DDP-aware, resumable.

    loader = TokenLoader("data/tokens", "train", batch_size=8, seq_len=256, seed=0,
                         rank=rank, world_size=world, grad_accum=accum)
    x, y = loader.get_batch(step, micro)      # int64 [B, T]; y is x shifted by one token
    for x, y in TokenLoader("data/tokens", "val", 8, 256).eval_batches(20): ...

The split's .bin files (meta.json lists them) are one virtual token stream: a memmap per file plus a
small offsets array. Window w is tokens [w*T, w*T + T + 1) (stride T, so windows overlap by the one
token that y needs), n_windows = (tokens - 1) // T; windows may straddle file boundaries.

Sampling is a pure function of (seed, step, micro, rank, world_size, grad_accum, batch_size): sample b
of micro-batch `micro` on `rank` has global index
    g = step * G + (micro * world_size + rank) * batch_size + b,   G = grad_accum * world_size * batch_size
and reads window perm_e(g mod n_windows) where e = g // n_windows is the epoch and perm_e a seeded
Feistel bijection of [0, n_windows) (4 rounds over the next power of four, cycle-walking back into range).
Nothing proportional to the corpus is held in memory. Consequences the trainer relies on (tested):
deterministic for (seed, step); within an epoch different ranks and micro-steps never share a window;
one global step reads the same set of windows for (world 2, accum 1) and (world 1, accum 2), so a
resumed run may change its process count; resuming is just calling get_batch(step) — nothing is replayed.

Inputs are checked on open (`read_meta`, `split_files`): a missing or corrupt meta.json, a token file whose
size is not a whole number of tokens, or files that no longer hold the token count meta.json records are
one UserError naming the file, never a silent run on different data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from z2all.utils import UserError

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A keyed bijection of [0, n) computed per index: O(1) memory whatever n is."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("permutation of an empty range")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half >= n, < 4n: ~<4 walks
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64(key * 0x100000001B3 + r) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        half, mask = self.half, self.mask
        x = i
        while True:
            left, right = x >> half, x & mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            x = (left << half) | right
            if x < self.n:  # cycle-walking: a bijection of the big domain restricted to [0, n)
                return x


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a token directory, checked for the keys the loader needs; UserError naming the file when
    it is missing, unreadable or incomplete (a directory without it is an unfinished `data tokenize`)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: the token directory must be the output of `z2all data tokenize` "
                        f"(a directory without meta.json is an unfinished run)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); rerun `z2all data tokenize`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); rerun `z2all data tokenize`")
    missing = [k for k in ("dtype", "vocab_size", "train_files", "val_files") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it was not written by `z2all data tokenize` "
                        f"(rerun it)")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        int(meta["vocab_size"])
    except (TypeError, ValueError):
        raise UserError(f"{path}: bad dtype {meta['dtype']!r} or vocab_size {meta['vocab_size']!r}; rerun "
                        f"`z2all data tokenize`") from None
    if np.dtype(meta["dtype"]).kind != "u" or itemsize not in (2, 4):
        raise UserError(f"{path}: dtype {meta['dtype']!r} is not a token dtype (uint16 or uint32)")
    for split in ("train", "val"):
        files = meta[f"{split}_files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise UserError(f"{path}: {split}_files must be a list of file names")
    return meta


def split_files(data_dir: str | Path, meta: dict, split: str) -> list[Path]:
    """The token files of one split, checked against meta.json: each exists, holds a whole number of tokens,
    and together they hold `<split>_tokens` tokens. A token file that was truncated, appended to or swapped
    after `data tokenize` would otherwise train (or resume) on different data without a word."""
    d = Path(data_dir)
    meta_path = d / "meta.json"
    itemsize = np.dtype(meta["dtype"]).itemsize
    paths, total = [], 0
    for name in meta[f"{split}_files"]:
        path = d / name
        if not path.is_file():
            raise UserError(f"{path} (listed in {meta_path}) is missing; rerun `z2all data tokenize`")
        size = path.stat().st_size
        if size % itemsize:
            raise UserError(f"{path} has {size:,} bytes, not a whole number of {meta['dtype']} tokens "
                            f"({itemsize} bytes each): it is truncated or not a token file; rerun "
                            f"`z2all data tokenize`")
        paths.append(path)
        total += size // itemsize
    want = meta.get(f"{split}_tokens")
    if want is not None and int(want) != total:
        names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise UserError(f"the {split} token files ({names}) hold {total:,} tokens but {meta_path} says "
                        f"{int(want):,}: a file was truncated, extended or replaced; rerun `z2all data tokenize`")
    return paths


class TokenLoader:
    def __init__(self, data_dir, split: str = "train", batch_size: int = 8, seq_len: int = 256, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.dir = Path(data_dir)
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', not '{split}'")
        if batch_size < 1 or seq_len < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad loader shape: batch_size={batch_size} seq_len={seq_len} grad_accum={grad_accum} "
                            f"rank={rank} world_size={world_size}")
        self.meta: dict = read_meta(self.dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.files = split_files(self.dir, self.meta, split)
        self.maps: list[np.ndarray] = [np.memmap(path, dtype=dtype, mode="r") for path in self.files
                                       if path.stat().st_size]  # np.memmap refuses empty files
        sizes = [len(m) for m in self.maps]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        self.n_windows = max(0, (self.n_tokens - 1) // seq_len)
        if self.n_windows == 0:
            raise UserError(f"the {split} split of {self.dir} has {self.n_tokens} tokens: too few for one window "
                            f"of seq_len+1 = {seq_len + 1}; use a smaller seq_len or more data")
        self._perms: dict[int, FeistelPermutation] = {}

    def _perm(self, epoch: int) -> FeistelPermutation:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 4:
                self._perms.clear()
            p = self._perms[epoch] = FeistelPermutation(self.n_windows, _mix64(self.seed) ^ epoch)
        return p

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start+len(out)) of the virtual stream into out (int64)."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, filled = start - int(self.offsets[i]), 0
        while filled < len(out):
            chunk = self.maps[i][pos: pos + len(out) - filled]
            out[filled: filled + len(chunk)] = chunk
            filled += len(chunk)
            i, pos = i + 1, 0

    def window_indices(self, step: int, micro: int = 0) -> list[int]:
        """The windows of one micro-batch of this rank (what get_batch reads)."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro {micro} outside [0, grad_accum={self.grad_accum})")
        B = self.batch_size
        G = self.grad_accum * self.world_size * B
        base = step * G + (micro * self.world_size + self.rank) * B
        out = []
        for g in range(base, base + B):
            epoch, i = divmod(g, self.n_windows)
            out.append(self._perm(epoch)(i))
        return out

    def _batch(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)
        for row, w in zip(buf, windows):
            self._read(w * T, row)
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def get_batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len], y[:, t] = the token after x[:, t]."""
        return self._batch(self.window_indices(step, micro))

    def eval_batches(self, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows 0, 1, 2, ... in order, batch_size at a time (the last batch may be smaller), at most
        max_batches batches: the same tokens on every call and every rank."""
        B = self.batch_size
        for k in range(max_batches):
            windows = list(range(k * B, min((k + 1) * B, self.n_windows)))
            if not windows:
                return
            yield self._batch(windows)
