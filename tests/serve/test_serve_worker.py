"""`z2all serve --engine process` (serve/worker.py, the default): the model in a process of its own. The two
engines (process and thread) give the same greedy answers; a dead engine process ends the open streams with
an error, /health and new requests answer 503, and the server stays up; Ctrl-C stops the server and its
engine process; the engine and the HTTP side run on separate CPUs when there are enough; an error while the
engine process starts is one line and exit 2; with a stream interval the engine process sends the same
events in fewer messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from serve_helpers import REPO, Server, cli_argv, make_ckpt, need_serve_deps

openai = need_serve_deps()

from z2all.serve import worker  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("worker"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except OSError:
        return False


def _cpus(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:"))


def test_process_and_thread_engines_agree(ckpt):
    reqs = [("chat", dict(messages=[{"role": "user", "content": "word " * n}], max_tokens=m, stop=s))
            for n, m, s in [(1, 12, None), (30, 24, None), (60, 16, ["e"]), (3, 20, [" ", "a"])]]
    reqs += [("completion", dict(prompt="def main():", max_tokens=20)),
             ("completion", dict(prompt="中文的", max_tokens=15, stop=["的"]))]
    answers = {}
    for engine in ("process", "thread"):
        s = Server(ckpt, "--engine", engine, "--max-batch", "4")
        try:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
            mid = c.models.list().data[0].id
            out = []
            for kind, kw in reqs:
                if kind == "chat":
                    r = c.chat.completions.create(model=mid, temperature=0, **kw)
                    out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
                else:
                    pieces = [ch.choices[0].text for ch in c.completions.create(model=mid, temperature=0, stream=True,
                                                                                **kw) if ch.choices]
                    out.append("".join(pieces))
            answers[engine] = out
            assert ("engine_pid" in s.stats()) == (engine == "process")
        finally:
            s.stop()
    assert answers["process"] == answers["thread"]
    assert any(a[0] for a in answers["process"][:4])  # real text, not all empty


def test_dead_engine_means_error_and_503_not_a_dead_server(ckpt):
    s = Server(ckpt, "--max-batch", "2")
    try:
        pid = s.stats()["engine_pid"]
        assert _alive(pid) and pid != s.proc.pid
        body = json.dumps({"prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}).encode()
        req = urllib.request.Request(s.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.readline().startswith(b"data: {")  # streaming has begun
            os.kill(pid, signal.SIGKILL)
            rest = r.read().decode()
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "engine process exited" in json.loads(events[-2])["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.url + "/health", timeout=10)
        assert e.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(s.url + "/v1/completions", json.dumps(
                {"prompt": "hi", "max_tokens": 2}).encode(), {"Content-Type": "application/json"}), timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read())["error"]["code"] == "engine_unavailable"
        assert s.proc.poll() is None  # the server itself is still up, and says what happened
        assert "engine process exited" in s.output()
    finally:
        s.stop()


def test_ctrl_c_stops_server_and_engine(ckpt):
    s = Server(ckpt)
    try:
        pid = s.stats()["engine_pid"]
        os.killpg(s.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
        assert s.proc.wait(timeout=20) == 0
        end = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        s.stop()


def test_ctrl_c_while_the_engine_loads_is_one_line(ckpt):
    """Ctrl-C reaches the whole process group; an engine process still importing torch must not print a
    KeyboardInterrupt traceback: it starts with SIGINT ignored, and the server says one line, exit 130."""
    p = subprocess.Popen(cli_argv("serve", "--ckpt", str(ckpt), "--port", "0"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        end = time.monotonic() + 60
        kids: list[str] = []
        while not kids and time.monotonic() < end and p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    kids = [k for k in f.read().split()
                            if "spawn_main" in open(f"/proc/{k}/cmdline").read()]
            except OSError:
                pass
            time.sleep(0.02)
        assert kids, "the engine process never started"
        time.sleep(0.3)  # inside its imports
        os.killpg(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130 and "interrupted" in out and "Traceback" not in out, out[-2000:]
    time.sleep(0.5)
    assert not any(_alive(int(k)) for k in kids)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split between engine and HTTP")
def test_engine_and_http_on_their_own_cpus(ckpt):
    cpus = sorted(os.sched_getaffinity(0))
    s = Server(ckpt)
    try:
        pid = s.stats()["engine_pid"]
        assert _cpus(pid) == str(cpus[-1])  # a small model decodes on one thread: one CPU
        assert s.stats()["engine_cpus"] == [cpus[-1]]  # /health says so (bench serve keeps its clients off it)
        assert str(cpus[-1]) not in _cpus(s.proc.pid).replace("-", ",").split(",") or len(cpus) > 2
    finally:
        s.stop()
    s = Server(ckpt, "--pin-cpus", "false")
    try:
        assert _cpus(s.stats()["engine_pid"]) == _cpus(s.proc.pid)
        assert s.stats()["engine_cpus"] is None
    finally:
        s.stop()


def test_split_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert worker.split_cpus(1) == ([0, 1, 2], [3])
    assert worker.split_cpus(3) == ([0], [1, 2, 3])
    assert worker.split_cpus(4) is None and worker.split_cpus(8) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert worker.split_cpus(1) is None


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_kv_cache_beyond_free_memory_is_refused(ckpt, engine):
    """Engine refuses a slot cache over 90% of free memory before allocating it, in either engine."""
    p = subprocess.run(cli_argv("serve", "--ckpt", str(ckpt), "--port", "0", "--engine", engine,
                                "--max-batch", "10000000"), capture_output=True, text=True, cwd=REPO,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "--max-batch 10000000" in p.stderr and "KV cache" in p.stderr and "Traceback" not in p.stderr


def test_engine_start_error_is_one_line(ckpt):
    p = subprocess.run(cli_argv("serve", "--ckpt", str(ckpt), "--port", "0", "--max-batch", "4",
                                "--max-tokens-in-cache", "5"), capture_output=True, text=True, cwd=REPO,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "--max-tokens-in-cache 5" in p.stderr and "Traceback" not in p.stderr


def test_engine_process_survives_a_request_it_refuses(ckpt):
    """A submit the engine refuses (here an empty prompt, which the server never sends) ends that request with
    an error event; the engine process keeps serving the next one."""
    import asyncio

    from z2all.serve.engine import SamplingParams, load_meta

    meta = load_meta(str(ckpt))
    ep = worker.EngineProcess(worker.EngineSpec(str(meta.path), meta.kind, str(meta.tok_dir), "cpu", "auto", 1,
                                                False, dict(max_batch=2)))
    try:
        async def main():
            loop = asyncio.get_running_loop()
            got: dict[int, list] = {}

            def waiter(rid):
                fut = loop.create_future()
                got[rid] = []

                def emit(ev):
                    got[rid].append(ev)
                    if ev.final and not fut.done():
                        fut.set_result(ev)
                return fut, emit

            fut_ok, emit_ok = waiter(1)
            ep.submit(meta.tok("hello")["input_ids"], SamplingParams(max_tokens=3, temperature=0), emit_ok)
            assert (await asyncio.wait_for(fut_ok, 60)).finish_reason in ("stop", "length")
            fut_bad, emit_bad = waiter(999)
            ep.handles[999] = worker.Handle(999, emit_bad)
            ep.conn.send(("submit", 999, [], SamplingParams(max_tokens=3)))  # bypasses the server's checks
            bad = await asyncio.wait_for(fut_bad, 60)
            assert bad.finish_reason == "error" and "empty prompt" in bad.error
            fut_again, emit_again = waiter(2)
            ep.submit(meta.tok("again")["input_ids"], SamplingParams(max_tokens=3, temperature=0), emit_again)
            again = await asyncio.wait_for(fut_again, 60)
            assert again.finish_reason in ("stop", "length") and ep.proc.is_alive()

        asyncio.run(main())
    finally:
        ep.close()
    assert not ep.proc.is_alive()


def test_engine_process_stream_interval_sends_fewer_messages_same_events(ckpt):
    """With stream_interval the child holds back events that are neither a request's first nor its final one
    until the interval has passed: the same events in the same order, in far fewer pipe messages (each wakes
    the HTTP process) than with per-step messages."""
    import asyncio

    from z2all.serve.engine import SamplingParams, load_meta

    meta = load_meta(str(ckpt))
    ids = meta.tok("def main():")["input_ids"]

    def run(interval: float) -> tuple[list[tuple], int]:
        ep = worker.EngineProcess(worker.EngineSpec(str(meta.path), meta.kind, str(meta.tok_dir), "cpu", "auto", 1,
                                                    False, dict(max_batch=2), interval))
        messages = [0]
        recv = ep.conn.recv_bytes

        def counting_recv():
            messages[0] += 1
            return recv()

        ep.conn.recv_bytes = counting_recv
        try:
            async def main():
                fut, got = asyncio.get_running_loop().create_future(), []

                def emit(ev):
                    got.append((ev.text, ev.final, ev.finish_reason, ev.completion_tokens))
                    if ev.final:
                        fut.set_result(None)
                ep.submit(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), emit)
                await asyncio.wait_for(fut, 60)
                return got

            return asyncio.run(main()), messages[0]
        finally:
            ep.close()

    each, n_each = run(0.0)
    held, n_held = run(30.0)
    assert "".join(t for t, *_ in held) == "".join(t for t, *_ in each) and held[-1] == each[-1]
    assert held[-1][1:] == (True, "length", 40)
    assert n_each > 10 and n_held == 2, (n_each, n_held)  # the first text event, then the rest with the final


def test_port_0_serves_on_the_port_it_prints(ckpt):
    """--port 0: the OS picks a free port, and the start-up line names it (it said :0 before), so a user (or
    a script) can connect."""
    import re

    p = subprocess.Popen(cli_argv("serve", "--ckpt", str(ckpt), "--port", "0"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = ""
        end = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < end and p.poll() is None:
            line = p.stderr.readline()
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+) ", line).group(1))
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
    finally:
        os.killpg(p.pid, signal.SIGINT)
        assert p.wait(timeout=30) == 0
