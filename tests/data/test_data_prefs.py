"""`z2all data prefs` (z2all/data/prefs.py): the record layouts (prompt/chosen/rejected with strings or messages,
HH-style full conversations, ShareGPT, mapped fields) give the same rendering; labels cover only the response;
bad records are skipped with file:line; the held-out split is by prompt; synthetic pairs are plausible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import assert_damaged_copies_refused

from z2all.data import prefs
from z2all.data.chat import Renderer
from z2all.utils import UserError


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory) -> Path:
    """A 384-token BPE with our ChatML template, trained on a few synthetic records."""
    from z2all.data import synthetic
    from z2all.tokenizer.train import Config, train_tokenizer

    d = tmp_path_factory.mktemp("prefs_tok")
    recs = list(synthetic.generate(200, seed=0))
    (d / "t.jsonl").write_text("".join(json.dumps({"text": "\n".join(m["content"] for m in r["messages"])},
                                                  ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    train_tokenizer(Config(inputs=[str(d / "t.jsonl")], out_dir=str(d / "tok"), vocab_size=384, workers=1))
    return d / "tok"


def _write(path: Path, recs: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in recs),
                    encoding="utf-8")
    return path


def test_layouts_render_the_same_and_label_only_the_response(tokdir, tmp_path):
    q, good, bad = "What is 2 + 3?", "5", "6"
    user = {"role": "user", "content": q}
    layouts = [
        {"prompt": q, "chosen": good, "rejected": bad},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": [user, {"role": "assistant", "content": good}],
         "rejected": [user, {"role": "assistant", "content": bad}]},
        {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
         "rejected": {"from": "gpt", "value": bad}},
    ]
    for i, rec in enumerate(layouts):
        out = tmp_path / f"o{i}"
        assert prefs.run(prefs.Config(inputs=[str(_write(tmp_path / f"in{i}.jsonl", [rec]))], tokenizer=str(tokdir),
                                      out=str(out), val_fraction=0.0)) == 0
        d = prefs.PrefData(out, "train")
        assert len(d) == 1
        got = [x.tolist() for x in d.pair(0)]
        if i == 0:
            first = got
        assert got == first, f"layout {i} differs"
    # fields schema with other names
    out = tmp_path / "fields"
    _write(tmp_path / "f.jsonl", [{"question": q, "good": good, "bad": bad}])
    prefs.run(prefs.Config(inputs=[str(tmp_path / "f.jsonl")], tokenizer=str(tokdir), out=str(out), schema="fields",
                           prompt_field="question", chosen_field="good", rejected_field="bad", val_fraction=0.0))
    assert [x.tolist() for x in prefs.PrefData(out, "train").pair(0)] == first
    # the labels are exactly the answer and the closing <|im_end|>
    r = Renderer(tokdir)
    cids, cmask, rids, rmask = (np.asarray(x) for x in first)
    (full, fmask), = r.render([[user, {"role": "assistant", "content": good}]])
    assert cids.tolist() == full and cmask.astype(int).tolist() == fmask
    im_end = r.specials["<|im_end|>"]
    assert cids[cmask][-1] == im_end and r.tok.decode(cids[cmask][:-1].tolist()) == good
    assert r.tok.decode(rids[rmask][:-1].tolist()) == bad


def test_multi_turn_prompt_trains_only_the_last_answer(tokdir, tmp_path):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "What is 1 + 1?"}]
    _write(tmp_path / "m.jsonl", [{"prompt": prompt, "chosen": "2", "rejected": "3"}])
    prefs.run(prefs.Config(inputs=[str(tmp_path / "m.jsonl")], tokenizer=str(tokdir), out=str(tmp_path / "o"),
                           val_fraction=0.0))
    cids, cmask, _, _ = prefs.PrefData(tmp_path / "o", "train").pair(0)
    r = Renderer(tokdir)
    assert r.tok.decode(cids[cmask].tolist(), skip_special_tokens=True) == "2"


def test_bad_records_are_skipped_with_file_line(tokdir, tmp_path, capsys):
    good = {"prompt": "a?", "chosen": "b", "rejected": "c"}
    recs = [good, "{not json", {"prompt": "a?", "chosen": "b"}, {"prompt": "a?", "chosen": "b", "rejected": "b"},
            {"prompt": "a?", "chosen": "  ", "rejected": "c"}, {"prompt": "a?", "chosen": 5, "rejected": "c"},
            {"chosen": [{"role": "robot", "content": "x"}], "rejected": []}, {**good, "prompt": "z?"}]
    f = _write(tmp_path / "bad.jsonl", recs)
    prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(tokdir), out=str(tmp_path / "o"), val_fraction=0.0,
                           max_skipped=0.9))
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    s = meta["stats"]
    assert meta["train_pairs"] == 2 and s["records"] == 8 and sum(s["skipped"].values()) == 6
    assert s["examples"]["malformed record"][0].startswith(f"{f}:2")
    assert "missing field" in s["skipped"] and "chosen == rejected" in s["skipped"]
    assert "skipped, unknown role: 1" in capsys.readouterr().out
    with pytest.raises(UserError, match="more than --max-skipped"):
        prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(tokdir), out=str(tmp_path / "o2"), max_skipped=0.5))
    with pytest.raises(UserError, match="no preference pair survived"):
        prefs.run(prefs.Config(inputs=[str(_write(tmp_path / "none.jsonl", recs[1:3]))], tokenizer=str(tokdir),
                               out=str(tmp_path / "o3")))


def test_synthetic_pairs_split_by_prompt_and_refuse_foreign_dirs(tokdir, tmp_path):
    from z2all.data import synthetic

    recs = list(synthetic.generate(300, seed=0))
    pairs = prefs.synthetic_pairs(recs)
    assert len(pairs) > 250
    for p in pairs:
        assert p["chosen"] == p["answer"] != p["rejected"]
        assert synthetic.exact_match(p["chosen"], p["answer"]) and not synthetic.exact_match(p["rejected"], p["answer"])
    assert any(len(p["rejected"]) > len(p["chosen"]) + 10 for p in pairs)  # over-long answers too
    f = _write(tmp_path / "p.jsonl", pairs + pairs[:20])  # repeated prompts land in the same split
    prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(tokdir), out=str(tmp_path / "o"), val_fraction=0.2))
    tr, va = prefs.PrefData(tmp_path / "o", "train"), prefs.PrefData(tmp_path / "o", "val")
    assert len(tr) + len(va) == len(pairs) + 20 and 0 < len(va) < len(tr)
    prompts = {s: {tuple(d.pair(k)[0][:int(np.argmax(d.pair(k)[1]))]) for k in range(len(d))}
               for s, d in (("train", tr), ("val", va))}
    assert not prompts["train"] & prompts["val"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UserError):
        prefs.run(prefs.Config(inputs=[str(f)], tokenizer=str(tokdir), out=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1


def test_damaged_files_are_one_line_errors_naming_the_file(tokdir, tmp_path):
    # what `z2all dpo` reads: a byte appended to train.bin crashed np.memmap (internal error); every file's size
    # is now checked against meta.json's counts before anything is mapped

    pairs = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(10)]
    out = tmp_path / "ok"
    prefs.run(prefs.Config(inputs=[str(_write(tmp_path / "p.jsonl", pairs))], tokenizer=str(tokdir), out=str(out),
                           val_fraction=0.0))
    assert len(prefs.PrefData(out, "train")) == 10  # intact: loads
    cases = [("train.bin", lambda b: b + b"\0", "not a whole number of uint16 tokens"),
             ("train.bin", lambda b: b + b"\0\0", "holds"),  # a whole token more: the count differs
             ("train.mask", lambda b: b + b"\1", "holds"),
             ("train.mask", lambda b: b[:-1], "holds"),
             ("train.idx", lambda b: b + b"\0", "not a whole number of pair entries"),
             ("train.idx", lambda b: b[:-32], "holds"),
             ("train.plen", lambda b: b + b"\0", "not a whole number of prompt-length entries")]
    assert_damaged_copies_refused(out, tmp_path, cases, lambda d: prefs.PrefData(d, "train"), "z2all data prefs")
    (out / "train.plen").unlink()
    with pytest.raises(UserError, match=r"train\.plen is missing"):
        prefs.PrefData(out, "train")
