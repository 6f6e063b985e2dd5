"""Shared by tests/serve: a tiny chat checkpoint (our specials and ChatML, a random model with sharp logits so
greedy choices are not near-ties), and the real `z2all serve` process on a free loopback port.

The server is the real `python -m z2all serve` process."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "z2all" / "data" / "demo"

def need_serve_deps(client: bool = True):
    """Skip the calling test module unless the serve extra is installed (fastapi, uvicorn) and, with
    client, the official `openai` client; returns the openai module (or None)."""
    import pytest

    openai = pytest.importorskip("openai") if client else None
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    return openai


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "z2all", *args]


def _texts(max_chars: int = 16_000) -> list[str]:
    texts, total = [], 0
    for name, field in (("code_python.jsonl.gz", "content"), ("zh_wiki.jsonl.gz", "text")):
        with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)[field][:4000]
                texts.append(t)
                total += len(t)
                if total >= max_chars:
                    break
    return texts


def make_tokenizer(path: Path, vocab_size: int = 384) -> Path:
    """A byte-level BPE with our specials and ChatML template (tokenizers' trainer, well under a second)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from z2all.tokenizer import hf
    from z2all.tokenizer.pretokenize import named_pattern

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = hf.byte_level_parts(named_pattern("z2all"))
    specials = hf.special_tokens([])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    hf.add_specials(tok, specials)
    hf.save_dir(tok, path, specials, model_max_length=256)
    return path


def make_ckpt(root: Path, max_seq_len: int = 256, std: float = 0.3, seed: int = 0) -> Path:
    """root/step-000001 with model + tokenizer/. std 0.3 (not the 0.02 of training) gives logits with clear
    winners, so greedy tokens are stable against fp32 rounding differences between batch sizes."""
    import torch

    from z2all.model.config import ModelConfig
    from z2all.model.llama import Z2all, save_model

    tok = make_tokenizer(root / "tok")
    tj = json.loads((tok / "tokenizer.json").read_text())
    n_tok = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=n_tok, ffn_dim=96,
                      max_seq_len=max_seq_len, rope_theta=10000.0, init_std=std)
    torch.manual_seed(seed)
    model = Z2all(cfg).eval()
    d = save_model(model, root / "step-000001")
    shutil.copytree(tok, d / "tokenizer")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`z2all serve` in a subprocess on 127.0.0.1:<free port>; waits for /health; stop() kills it."""

    def __init__(self, ckpt: Path, *args: str, timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(Path(ckpt).parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cli_argv("serve", "--ckpt", str(ckpt), "--port", str(self.port),
                                              "--threads", "1", *args),
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"server did not come up in {timeout} s: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
