"""`z2all chat`: a real process fed on stdin (slow) (turns stream answers, /params /system /reset /help /exit,
bad commands answered without quitting, trimming to the context announced, an HF export directory as
--ckpt), and in-process: Ctrl-C during an answer stops that answer only, greedy answers equal generate()."""

from __future__ import annotations

import io
import subprocess

import pytest
from serve_helpers import REPO, cli_argv, make_ckpt

from z2all.utils import UserError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("chat"), max_seq_len=128)


def chat(ckpt, stdin: str, *args: str):
    return subprocess.run(cli_argv("chat", "--ckpt", str(ckpt), "--device", "cpu", *args), input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})


@pytest.mark.slow
def test_chat_session_commands_and_trimming(ckpt, tmp_path):
    from z2all.model.hf_compat import export_hf

    script = "\n".join([
        "/help", "/params temperature=0 max_new_tokens=12", "Hello there", "/params temperature=abc",
        "/params nope=1", "/frobnicate", "/system Be brief.", "Tell me more about it", "/reset", "Again",
        "/exit", "never read",
    ]) + "\n"
    r = chat(ckpt, script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Traceback" not in r.stderr + out
    assert "commands: /reset" in out and "temperature=0.0" in out
    assert "is not a number" in out and "key one of" in out and "unknown command /frobnicate" in out
    assert "[system prompt set]" in out and "[conversation cleared]" in out
    assert out.count("> ") >= 10
    # a short context: the conversation is trimmed oldest first, and the user is told
    long = "\n".join(["/params temperature=0"] + [f"message number {i} with some words" for i in range(6)]) + "\n"
    r = chat(ckpt, long, "--context", "48", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "outgrew the context of 48 tokens: dropped the oldest" in r.stdout
    # a message longer than the whole context is refused, the chat goes on
    r = chat(ckpt, "word " * 200 + "\nhi\n", "--context", "48", "--max-new-tokens", "8")
    assert r.returncode == 0 and "does not fit" in r.stdout and r.stdout.count("> ") >= 3
    # an HF Llama directory (our export) chats too
    hf = export_hf(ckpt, tmp_path / "hf")
    r = chat(hf, "/params temperature=0 max_new_tokens=6\nHi\n")
    assert r.returncode == 0 and "ChatML chat model" in r.stdout, r.stderr
    # bad options are one clear line
    r = chat(ckpt, "", "--temperature", "-1")
    assert r.returncode == 2 and "--temperature must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_trimming_in_process(ckpt):
    """The fast twin of the slow process test's trimming: oldest turns go first, the user is told, the
    system prompt stays, a message longer than the context is refused and the chat goes on."""
    import torch

    from z2all.serve.chat import Config, Session
    from z2all.serve.engine import load

    torch.set_num_threads(1)
    loaded = load(str(ckpt), device="cpu")
    out = io.StringIO()
    s = Session(loaded, Config(ckpt=str(ckpt), temperature=0.0, max_new_tokens=8, context=64, system="Be kind."),
                out=out)
    for i in range(6):
        s.ask(f"hi {i}")
    assert "outgrew the context of 64 tokens: dropped the oldest" in out.getvalue(), out.getvalue()
    assert s.turns[-2]["content"] == "hi 5" and len(s.turns) < 12
    assert s._messages()[0] == {"role": "system", "content": "Be kind."}
    n = len(s.turns)
    s.ask("word " * 100)
    assert "does not fit" in out.getvalue() and len(s.turns) == n
    s.command("/params temperature=0.5 top_k=5")
    assert s.params["temperature"] == 0.5 and s.params["top_k"] == 5
    with pytest.raises(UserError, match="top_p"):
        s.command("/params top_p=2")
    with pytest.raises(UserError, match="No closing quotation"):  # was an internal error that ended the chat
        s.command('/params temperature="0.5')
    assert s.params["temperature"] == 0.5


def test_ctrl_c_stops_the_answer_not_the_chat(ckpt, monkeypatch):
    import torch

    from z2all.model import generate as G
    from z2all.serve.chat import Config, Session
    from z2all.serve.engine import load, render_chat

    torch.set_num_threads(1)
    loaded = load(str(ckpt), device="cpu")
    out = io.StringIO()
    s = Session(loaded, Config(ckpt=str(ckpt), temperature=0.0, max_new_tokens=20), out=out)
    first = s.ask("Hello")
    ref = G.generate(loaded.model, [render_chat(loaded.tok, [{"role": "user", "content": "Hello"}], True)], 20,
                     eos_id=loaded.eos_ids)[0]
    assert first == loaded.tok.decode(ref, skip_special_tokens=True)  # greedy == the reference path
    calls = {"n": 0}
    orig = G._Streamer.__call__

    def interrupt(self, row, token):
        calls["n"] += 1
        orig(self, row, token)
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(G._Streamer, "__call__", interrupt)
    partial = s.ask("And then?")
    assert "[stopped]" in out.getvalue()
    assert s.turns[-1] == {"role": "assistant", "content": partial} and len(s.turns) == 4
    monkeypatch.setattr(G._Streamer, "__call__", orig)
    s.ask("Go on")  # the chat continues
    assert len(s.turns) == 6
