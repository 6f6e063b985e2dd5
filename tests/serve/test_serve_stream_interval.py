"""`z2all serve --stream-interval S`: a stream's tokens after the first reach the client in chunks at most every
S seconds (api.py _Inbox: fewer wake-ups of the event loop per token), with the same text, finish_reason and
usage as per-token streaming; a value outside 0..1 s is a one-line error. _Inbox itself: every event arrives,
in order, with interval 0 one wake-up per event, with an interval far fewer."""

from __future__ import annotations

import asyncio
import threading

import pytest
from serve_helpers import Server, make_ckpt, need_serve_deps

openai = need_serve_deps()

from z2all.serve.api import Config, _Inbox, build  # noqa: E402
from z2all.serve.engine import Event  # noqa: E402
from z2all.utils import UserError  # noqa: E402


@pytest.mark.parametrize("interval", [0.0, 0.5])
def test_inbox_delivers_every_event_in_order(interval):
    async def main():
        inbox = _Inbox(asyncio.get_running_loop(), interval)
        wakes = []
        real_set = inbox.ready.set
        inbox.ready.set = lambda: (wakes.append(1), real_set())

        def engine():  # 30 deltas in a burst, then the final event, from another thread
            for i in range(30):
                inbox.put(Event(text=f"{i},"))
            inbox.put(Event(final=True, finish_reason="length"))

        t = threading.Thread(target=engine)
        t.start()
        got = []
        while True:
            ev = await asyncio.wait_for(inbox.get(), 5)
            got.append(ev)
            if ev.final:
                break
        t.join()
        return got, len(wakes)

    got, wakes = asyncio.run(main())
    assert "".join(e.text for e in got) == "".join(f"{i}," for i in range(30)) and got[-1].finish_reason == "length"
    assert wakes == 31 if interval == 0 else wakes <= 3  # the first and the final event (+ one per interval)


def test_stream_interval_same_text_fewer_chunks(tmp_path):
    with pytest.raises(UserError, match="--stream-interval"):
        build(Config(ckpt=str(tmp_path), stream_interval=2.0))
    s = Server(make_ckpt(tmp_path), "--stream-interval", "0.2")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        mid = c.models.list().data[0].id
        args = dict(model=mid, prompt="def main():", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        whole = c.completions.create(**args)
        chunks = [ch for ch in c.completions.create(stream=True, **args) if ch.choices]
        pieces = [ch.choices[0].text for ch in chunks if ch.choices[0].text]
        assert "".join(pieces) == whole.choices[0].text and chunks[-1].choices[0].finish_reason == "length"
        assert len(pieces) < 20, pieces  # 40 tokens in well under a second: a handful of chunks, not 40
    finally:
        s.stop()
