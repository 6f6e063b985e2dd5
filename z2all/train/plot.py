"""`z2all plot RUN`: draw a run's curves from its metrics.jsonl to PNG files next to it.

    z2all plot runs/demo/train                 # -> runs/demo/train/loss.png, throughput.png

loss.png: train loss per logged step and validation loss per evaluation, against step (and tokens seen on
the top axis when recorded). throughput.png: tokens/s and, when the device has a known peak, MFU (%).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt
from z2all.train.metrics import read_metrics
from z2all.utils import UserError, print0


@dataclass
class Config:
    run: str = opt("runs/demo/train", "run directory holding metrics.jsonl", positional=True)
    out_dir: str = opt("", "where the PNGs go; '' = the run directory")


def run(cfg: Config) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("z2all plot needs matplotlib: pip install 'llm-zero2all[plot]'") from None
    run_dir = Path(cfg.run)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}/metrics.jsonl not found: RUN must be a `z2all train` out_dir")
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    if not train and not val:
        raise UserError(f"{run_dir}/metrics.jsonl holds no train or val records yet")
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    written = [loss_png]
    if train:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["tokens_per_s"] for r in train], color="tab:blue", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s", color="tab:blue")
        ax.grid(alpha=0.3)
        mfus = [r.get("mfu") for r in train]
        if any(m is not None for m in mfus):
            ax2 = ax.twinx()
            ax2.plot(steps, [100 * m if m is not None else float("nan") for m in mfus], color="tab:red", lw=1)
            ax2.set_ylabel("MFU (%)", color="tab:red")
        ax.set_title(f"{run_dir.name}: throughput")
        fig.tight_layout()
        tp_png = out / "throughput.png"
        fig.savefig(tp_png, dpi=110)
        plt.close(fig)
        written.append(tp_png)
    print0("wrote " + ", ".join(str(p) for p in written))
    return 0
