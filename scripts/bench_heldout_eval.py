"""What the held-out scores cost next to the validation loss, on a finished demo run, and what
`demo_report` (the `make demo` evaluation table) prints and costs.

    .venv/bin/python scripts/bench_heldout_eval.py runs/demo            # after `make demo` (or z2all demo)
    .venv/bin/python scripts/bench_heldout_eval.py /tmp/d --threads 2

Rows, each timed once in this process (wall seconds and this process's CPU seconds), on the latest
checkpoint of <demo>/train with torch at --threads threads:
  - the validation loss as the demo's training loop computes it (eval.max_batches=10 micro-batches of
    16 x 128 tokens);
  - the in-training held-out scores (z2all/eval/intrain.py) at a few bounds, windows of 128 tokens (the
    demo's data.seq_len); setup (reading the held-out documents, counting the unigram) is paid once per run;
  - demo_report with its defaults, then (the control) demo_report on a random-init model of the same
    shape, tokenizer and config.json: what a model that learned nothing scores on the same items.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from z2all.config import load_config
from z2all.data.loader import TokenLoader
from z2all.eval import intrain, run
from z2all.model.llama import Z2all, load_model, save_model
from z2all.train import checkpoint
from z2all.train.pretrain import Config


def timed(f):
    w, c = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", help="the --out_dir of `z2all demo` (holds tokens/ and train/)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    tokens, ck = demo / "tokens", checkpoint.latest_checkpoint(demo / "train")
    torch.set_num_threads(args.threads)
    model = load_model(ck)
    val = TokenLoader(tokens, "val", batch_size=16, seq_len=128, seed=1337)

    def val_loss():
        model.eval()
        with torch.no_grad():
            total = sum(float(model(x, y)[1]) for x, y in val.eval_batches(10))
        model.train()
        return total / 10

    rows = []
    _, w, c = timed(val_loss)
    rows.append(("validation loss, 10 batches of 16 x 128 tokens (the demo's eval.max_batches)", w, c))
    for bpb, items in ((4096, 0), (0, 32), (4096, 32), (10_000, 100)):
        cfg = load_config(Config, None, [f"--eval.bpb_max_tokens={bpb}", f"--eval.tasks_max_items={items}"])
        held, ws, _ = timed(lambda cfg=cfg: intrain.build(cfg.eval, tokens, ck / "tokenizer", 128))
        _, w, c = timed(lambda held=held: held(model, nullcontext()))
        rows.append((f"held-out scores, bpb_max_tokens={bpb} tasks_max_items={items} per domain "
                     f"(+{ws:.1f} s setup once)", w, c))
    (text, res), w, c = timed(lambda: run.demo_report(ck, tokens, threads=args.threads))
    rows.append(("demo_report(ckpt, tokens) with its defaults", w, c))
    with tempfile.TemporaryDirectory() as tmp:  # the control: same shape, tokenizer and config, random weights
        rand = Path(tmp) / "random-init"
        torch.manual_seed(0)
        save_model(Z2all(model.cfg), rand)
        shutil.copytree(ck / "tokenizer", rand / "tokenizer")
        shutil.copy(ck / "config.json", rand / "config.json")
        control, _ = run.demo_report(rand, tokens, threads=args.threads)
    print(f"\n{ck}, torch threads {torch.get_num_threads()}\n")
    print("| what | wall s | CPU s |\n| --- | --- | --- |")
    for name, w, c in rows:
        print(f"| {name} | {w:.2f} | {c:.2f} |")
    print(f"\ndemo_report({ck}):\n\n{text}")
    print(f"control, a random-init model of the same shape:\n\n{control}")


if __name__ == "__main__":
    main()
