"""`z2all plot RUN`: draw a run's curves from its metrics.jsonl to PNG files next to it.

    z2all plot runs/demo/train                 # -> runs/demo/train/loss.png, throughput.png (+ heldout.png)
    z2all plot runs/demo/sft                   # an SFT run: the same, plus held-out exact match

loss.png: train loss per logged step and validation loss per evaluation, against step; for a `z2all sft` run
also the held-out exact match of each evaluation's greedy answers (right axis, %).
throughput.png: tokens/s and, when the device has a known peak, MFU (%).
heldout.png (only for a run trained with --eval.bpb_max_tokens / --eval.tasks_max_items): a panel per metric
family of its "heldout" records, a line per domain: bits per byte (solid; the domain's unigram baseline dashed
in the same colour) and "which continuation?" accuracy (acc solid, acc_mi dashed, chance dotted).

It writes those files and nothing else, each through a temp file + rename. Every PNG it writes carries a
`Software: z2all plot` text chunk; an existing loss.png/throughput.png without it (a user's own figure) is
never overwritten: the command refuses and names it. `--out_dir` may be any directory (created if missing)
but not a file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.io import atomic_open, read_owner
from z2all.train.metrics import read_metrics
from z2all.utils import UserError, print0

MARK = "z2all plot"  # the PNG `Software` text of every figure this command writes
NAMES = ("loss.png", "throughput.png", "heldout.png")


@dataclass
class Config:
    run: str = opt("runs/demo/train", "run directory holding metrics.jsonl", positional=True)
    out_dir: str = opt("", "where the PNGs go; '' = the run directory")


def written_by_us(path: Path) -> bool:
    """Whether the PNG at `path` carries our `Software` text chunk (chunks before the image data only)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                    return False
                data = f.read(length)
                f.seek(4, 1)  # CRC
                if kind == b"tEXt" and data.split(b"\0", 1) == [b"Software", MARK.encode()]:
                    return True
    except OSError:
        return False


def _targets(cfg: Config, run_dir: Path) -> Path:
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--out_dir {out} is a file, not a directory; choose a directory for the PNGs")
    for name in NAMES:
        p = out / name
        if p.is_symlink() or (p.exists() and not (p.is_file() and written_by_us(p))):
            raise UserError(f"{p} exists and was not written by `z2all plot`; it is left alone: move it or choose "
                            "another --out_dir")
    return out


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata={"Software": MARK})


def run(cfg: Config) -> int:
    run_dir = Path(cfg.run)
    if not run_dir.is_dir():
        raise UserError(f"RUN {run_dir} is not a directory: give a `z2all train` or `z2all sft` out_dir")
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}/metrics.jsonl not found: RUN must be a `z2all train` or `z2all sft` out_dir")
    out = _targets(cfg, run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("z2all plot needs matplotlib: pip install 'llm-zero2all[plot]'") from None

    def num(r: dict, key: str) -> bool:
        return isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)

    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train" and num(r, "loss")]
    val = [r for r in recs if r.get("kind") == "val" and num(r, "val_loss")]
    em = [r for r in recs if r.get("kind") == "sample" and num(r, "exact_match")]  # SFT evaluations
    if not train and not val:
        raise UserError(f"{run_dir}/metrics.jsonl holds no train or val records yet")
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:  # a single point is drawn only with a marker (a line needs two)
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], "o-" if len(train) < 2 else "-",
                label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    dpo = read_owner(run_dir) == "dpo"  # a preference loss, not a per-token cross-entropy
    ax.set_ylabel("DPO loss (preference pairs)" if dpo else "cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if em:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in em], [100 * r["exact_match"] for r in em], "s--", color="tab:green", lw=1.5,
                 label="held-out exact match")
        ax2.set_ylabel("held-out exact match (%)", color="tab:green")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="upper right")
    fig.tight_layout()
    loss_png = out / "loss.png"
    _save(fig, loss_png)
    plt.close(fig)

    written = [loss_png]
    if train:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = [r["step"] for r in train]
        ax.plot(steps, [r.get("tokens_per_s") or math.nan for r in train], "o-" if len(train) < 2 else "-",
                color="tab:blue", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s", color="tab:blue")
        ax.grid(alpha=0.3)
        mfus = [r.get("mfu") for r in train]
        if any(m is not None for m in mfus):
            ax2 = ax.twinx()
            ax2.plot(steps, [100 * m if m is not None else math.nan for m in mfus], color="tab:red", lw=1)
            ax2.set_ylabel("MFU (%)", color="tab:red")
        ax.set_title(f"{run_dir.name}: throughput")
        fig.tight_layout()
        tp_png = out / "throughput.png"
        _save(fig, tp_png)
        plt.close(fig)
        written.append(tp_png)
    held = [r for r in recs if r.get("kind") == "heldout" and isinstance(r.get("step"), int)]
    if any(r.get("bpb") or r.get("continuation_acc") for r in held):
        fig = heldout_figure(plt, held, run_dir.name)
        held_png = out / "heldout.png"
        _save(fig, held_png)
        plt.close(fig)
        written.append(held_png)
    print0("wrote " + ", ".join(str(p) for p in written))
    return 0


def _series(recs: list[dict], family: str) -> dict[str, tuple[list[int], list[float]]]:
    """{domain: (steps, values)} of one per-domain family of the heldout records (non-numbers skipped)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in recs:
        fam = r.get(family)
        if not isinstance(fam, dict):
            continue
        for dom, v in fam.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps, vals = out.setdefault(str(dom), ([], []))
                steps.append(r["step"])
                vals.append(float(v))
    return out


def heldout_figure(plt, recs: list[dict], title: str):
    """Panels: bits per byte per domain (+ unigram dashed) and continuation accuracy per domain (+ chance)."""
    bpb, uni = _series(recs, "bpb"), _series(recs, "unigram_bpb")
    acc, acc_mi = _series(recs, "continuation_acc"), _series(recs, "continuation_acc_mi")
    panels = [p for p in ("bpb", "acc") if (bpb if p == "bpb" else acc)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    colors = {d: f"C{i}" for i, d in enumerate(sorted(set(bpb) | set(acc)))}
    for ax, panel in zip(axes[0], panels):
        if panel == "bpb":
            for dom, (steps, vals) in sorted(bpb.items()):
                ax.plot(steps, vals, "o-", color=colors[dom], lw=1.5, ms=3, label=dom)
                if dom in uni:
                    ax.plot(*uni[dom], "--", color=colors[dom], lw=1, label=f"{dom} unigram")
            ax.set_ylabel("bits per byte (lower is better)")
            ax.set_title(f"{title}: held-out bits per byte")
        else:
            for dom, (steps, vals) in sorted(acc.items()):
                ax.plot(steps, [100 * v for v in vals], "s-", color=colors[dom], lw=1.5, ms=3, label=f"{dom} acc")
                if dom in acc_mi:
                    mi_steps, mi_vals = acc_mi[dom]
                    ax.plot(mi_steps, [100 * v for v in mi_vals], "^--", color=colors[dom], lw=1, ms=3,
                            label=f"{dom} acc_mi")
            chance = next((r["chance"] for r in recs if isinstance(r.get("chance"), (int, float))), None)
            if chance:
                ax.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
            ax.set_ylim(0, 100)
            ax.set_ylabel("'which continuation?' accuracy (%)")
            ax.set_title(f"{title}: held-out continuation task")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
