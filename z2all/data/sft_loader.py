"""Micro-batches for supervised fine-tuning from `z2all data chat` output: packed rows (the default) or
one padded example per row (the simple baseline).

    from z2all.data.sft_loader import SFTBatches
    batches = SFTBatches("data/chat", "train", seq_len=512, batch_size=8, mode="pack", seed=0)
    b = batches.get_batch(step, micro)     # SFTBatch(x, y, positions, segment_ids)
    _, loss = model(b.x, b.y, positions=b.positions, segment_ids=b.segment_ids)

An example of L tokens (the template's rendering, ids + loss mask) occupies L positions of a row. Its
targets are the next token where that token is trained on (mask 1: assistant content and the `<|im_end|>`
closing the turn), else -100; its last position has no target (the next token belongs to another example).
So a packed row trains exactly the terms the examples would train one by one.

pack: examples, in a shuffled order per epoch (seed, epoch), fill rows of `seq_len` first-come: an example
    that does not fit the rest of a row starts the next row. Every row is `seq_len` long; its positions
    restart at 0 per example (RoPE) and `segment_ids` name the example of each position, so attention never
    crosses examples (ops.attention's segment_ids); the tail after the last example is padding (its own
    segment, no target).
pad: one example per row, right-padded to the longest row of the micro-batch (causal attention: real tokens
    never see the padding after them, so no mask is needed); positions/segment_ids are None.

Examples longer than seq_len are cut to seq_len (counted in `truncated`); an example with no trained token
left is dropped (counted in `dropped`).

The rows of all epochs form one stream; step s, micro-batch m on rank r reads the `batch_size` rows of chunk
c = m * world_size + r of step s's `grad_accum * world_size * batch_size` rows. So the micro-batches of a
step do not depend on how they are split between processes and accumulation (2 processes x 1 == 1 x 2),
and `get_batch(step, micro)` is a pure function: a resume just asks for the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from z2all.data.chat import ChatData
from z2all.utils import UserError

MODES = ("pack", "pad")
IGNORE = -100


@dataclass
class SFTBatch:
    x: torch.Tensor                        # [B, T] int64 input ids
    y: torch.Tensor                        # [B, T] int64 targets, -100 = no loss
    positions: torch.Tensor | None         # [B, T] int64 RoPE positions (pack), else None
    segment_ids: torch.Tensor | None       # [B, T] int32 example of each position (pack), else None

    def to(self, device) -> SFTBatch:
        mv = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return SFTBatch(mv(self.x), mv(self.y), mv(self.positions), mv(self.segment_ids))


def load_examples(data_dir: str | Path, split: str, seq_len: int) -> tuple[list, int, int]:
    """(ids int64, mask bool) per example of the split, cut to seq_len; plus the counts truncated, dropped."""
    data = ChatData(data_dir, split)
    out, truncated, dropped = [], 0, 0
    for k in range(len(data)):
        ids, mask = data.example(k)
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        mask = mask.astype(bool)
        if len(ids) < 2 or not mask[1:].any():
            dropped += 1
            continue
        out.append((ids.astype(np.int64), mask))
    return out, truncated, dropped


def pack_rows(lengths: list[int], order, seq_len: int) -> list[list[int]]:
    """Example indices per row, filling rows of seq_len in `order`, first-come."""
    rows, cur, used = [], [], 0
    for e in order:
        n = lengths[e]
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(e))
        used += n
    if cur:
        rows.append(cur)
    return rows


class SFTBatches:
    def __init__(self, data_dir: str | Path, split: str = "train", *, seq_len: int, batch_size: int,
                 mode: str = "pack", seed: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 shuffle: bool = True, pad_id: int = 0):
        if mode not in MODES:
            raise UserError(f"--data.packing={mode}: choose from {', '.join(MODES)}")
        self.dir, self.split = Path(data_dir), split
        self.seq_len, self.batch_size, self.mode, self.seed = seq_len, batch_size, mode, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.shuffle, self.pad_id = shuffle, pad_id
        self.examples, self.truncated, self.dropped = load_examples(data_dir, split, seq_len)
        if not self.examples:
            raise UserError(f"{self.dir}: the {split} split has no example with a trained (assistant) token "
                            f"within --data.seq_len={seq_len}")
        self.lengths = [len(ids) for ids, _ in self.examples]
        self._epochs: list[list[list[int]]] = []
        self._starts = [0]  # first global row of each planned epoch

    # ---------------------------------------------------------------- the row stream

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            n = len(self.examples)
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            rows = pack_rows(self.lengths, order, self.seq_len) if self.mode == "pack" else [[int(i)] for i in order]
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[epoch]

    def row(self, g: int) -> list[int]:
        e = 0
        while True:
            rows = self.epoch_rows(e)
            if g < self._starts[e + 1]:
                return rows[g - self._starts[e]]
            e += 1

    @property
    def rows_per_step(self) -> int:
        return self.grad_accum * self.world_size * self.batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps that cover `epochs` passes over the examples (at least 1)."""
        whole = int(epochs)
        rows = sum(len(self.epoch_rows(e)) for e in range(whole))
        if epochs > whole:
            rows += int(round((epochs - whole) * len(self.epoch_rows(whole))))
        return max(1, -(-rows // self.rows_per_step))

    def padding_share(self, epoch: int = 0) -> float:
        """Share of the positions of an epoch's rows that are padding (pad mode: per micro-batch of
        batch_size rows padded to their longest)."""
        rows = self.epoch_rows(epoch)
        real = sum(self.lengths[e] for r in rows for e in r)
        if self.mode == "pack":
            total = len(rows) * self.seq_len
        else:
            total = sum(max(self.lengths[r[0]] for r in rows[i:i + self.batch_size]) * len(rows[i:i + self.batch_size])
                        for i in range(0, len(rows), self.batch_size))
        return 1.0 - real / max(total, 1)

    def real_tokens_per_row(self, epoch: int = 0) -> float:
        rows = self.epoch_rows(epoch)
        return sum(self.lengths[e] for r in rows for e in r) / len(rows)

    # ---------------------------------------------------------------- batches

    def get_batch(self, step: int, micro: int) -> SFTBatch:
        chunk = micro * self.world_size + self.rank
        first = step * self.rows_per_step + chunk * self.batch_size
        return self.collate([self.row(g) for g in range(first, first + self.batch_size)])

    def collate(self, rows: list[list[int]]) -> SFTBatch:
        B = len(rows)
        if self.mode == "pack":
            T = self.seq_len
        else:
            T = max(sum(self.lengths[e] for e in r) for r in rows)
        x = np.full((B, T), self.pad_id, dtype=np.int64)
        y = np.full((B, T), IGNORE, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        seg = np.zeros((B, T), dtype=np.int32)
        for b, r in enumerate(rows):
            o = 0
            for s, e in enumerate(r):
                ids, mask = self.examples[e]
                n = len(ids)
                x[b, o:o + n] = ids
                y[b, o:o + n - 1] = np.where(mask[1:], ids[1:], IGNORE)
                pos[b, o:o + n] = np.arange(n)
                seg[b, o:o + n] = s
                o += n
            seg[b, o:] = len(r)  # padding: a segment of its own, positions 0.., no targets
            pos[b, o:] = np.arange(T - o)
        if self.mode == "pack":
            return SFTBatch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos), torch.from_numpy(seg))
        return SFTBatch(torch.from_numpy(x), torch.from_numpy(y), None, None)

    def eval_batches(self, max_batches: int):
        """The split's rows in file order (not shuffled), this rank's share, at most max_batches micro-batches;
        the same on every call."""
        rows = (pack_rows(self.lengths, range(len(self.examples)), self.seq_len) if self.mode == "pack"
                else [[i] for i in range(len(self.examples))])
        mine = rows[self.rank::self.world_size]
        for i in range(0, min(len(mine), max_batches * self.batch_size), self.batch_size):
            yield self.collate(mine[i:i + self.batch_size])


def sft_loss(model, batch: SFTBatch, device) -> torch.Tensor:
    """Mean cross-entropy over the trained (assistant) targets of a micro-batch."""
    b = batch.to(device)
    if b.positions is None:
        _, loss = model(b.x, b.y)
    else:
        _, loss = model(b.x, b.y, positions=b.positions, segment_ids=b.segment_ids)
    return loss
