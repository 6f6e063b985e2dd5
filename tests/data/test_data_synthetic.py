"""The synthetic instruction set: answers are right, generation is deterministic and prefix-stable, the
held-out split shares no prompt with train, both languages and every task appear, exact-match scoring
normalises what it should, and `data synth` writes files that `data chat` reads with the auto schema."""

from __future__ import annotations

import json
import re

import pytest

from z2all.data import synthetic as syn
from z2all.utils import UserError


@pytest.mark.parametrize("n,zh", [(0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (110, "一百一十"),
                                  (101, "一百零一"), (1005, "一千零五"), (1050, "一千零五十"), (1500, "一千五百"),
                                  (10010, "一万零一十"), (10500, "一万零五百"), (20000, "二万"),
                                  (99999, "九万九千九百九十九"), (100010, "十万零一十"), (1000001, "一百万零一")])
def test_chinese_numerals(n, zh):
    assert syn.to_chinese(n) == zh and syn.from_chinese(zh) == n


def test_chinese_numerals_round_trip():
    for n in list(range(0, 3000)) + list(range(9990, 12100, 7)) + list(range(99000, 100000, 13)):
        assert syn.from_chinese(syn.to_chinese(n)) == n


def check_answer(r: dict) -> None:
    """Recompute the expected answer from the prompt alone."""
    p, a = syn.prompt_of(r), r["answer"]
    assert r["messages"][-1] == {"role": "assistant", "content": a}
    if r["task"] == "arithmetic":
        x, op, y = re.search(r"(\d+) (?:([-+×])|加|减|乘以) ?(?:[-+×] )?(\d+)", p).groups()
        word = re.search(r"\d+ (加|减|乘以) \d+", p)
        op = op or {"加": "+", "减": "-", "乘以": "×"}[word.group(1)]
        assert int(a) == {"+": int(x) + int(y), "-": int(x) - int(y), "×": int(x) * int(y)}[op]
    elif r["task"] == "reverse":
        shown = p.split("：" if "：" in p else ": ", 1)[1]
        sep = "、" if "、" in shown else " "
        assert a == sep.join(reversed(shown.split(sep)))
    elif r["task"] == "count":
        c, s = re.findall(r'"([^"]+)"', p) if r["lang"] == "en" else re.findall(r"“([^”]+)”", p)[::-1]
        assert int(a) == s.count(c)
    elif r["task"] == "numeral":
        if a.isdigit():
            assert syn.to_chinese(int(a)) in p
        else:
            assert str(syn.from_chinese(a)) in p and syn.to_chinese(syn.from_chinese(a)) == a
    else:
        assert r["task"] == "title" and a in p.split("\n\n")[1]


def test_examples_are_correct_mixed_and_deterministic():
    recs = list(syn.generate(500, seed=3))
    for r in recs:
        check_answer(r)
    assert {r["task"] for r in recs} == set(syn.TASKS) and {r["lang"] for r in recs} == {"en", "zh"}
    assert sum(r["task"] == "count" for r in recs) == 100  # tasks take turns
    assert recs == list(syn.generate(500, seed=3))
    assert recs[:100] == list(syn.generate(100, seed=3))  # a larger n extends a smaller one
    assert [syn.prompt_of(r) for r in recs[:20]] != [syn.prompt_of(r) for r in syn.generate(20, seed=4)]
    only = list(syn.generate(10, tasks=["numeral"]))
    assert {r["task"] for r in only} == {"numeral"}
    with pytest.raises(UserError, match="choose from"):
        list(syn.generate(1, tasks=["poetry"]))


def test_split_is_disjoint_by_prompt_and_stable():
    parts = syn.split(syn.generate(2000, seed=0), seed=0, fraction=0.1)
    train = {syn.prompt_of(r) for r in parts["train"]}
    held = {syn.prompt_of(r) for r in parts["heldout"]}
    assert not train & held and 100 < len(held) < 300
    assert len(train) == len(parts["train"])  # each prompt once per split
    small = syn.split(syn.generate(500, seed=0), seed=0, fraction=0.1)
    assert {syn.prompt_of(r) for r in small["heldout"]} <= held


def test_exact_match_normalises():
    assert syn.exact_match(" 42。", "42") and syn.exact_match("４２", "42") and syn.exact_match("Forty", "forty")
    assert syn.exact_match("a  b\n c.", "a b c") and syn.exact_match("一千零五", "一千零五")
    assert not syn.exact_match("43", "42") and not syn.exact_match("c b a", "a b c")
    recs = list(syn.generate(10))
    s = syn.score(recs, [r["answer"] if i % 2 else "wrong" for i, r in enumerate(recs)])
    assert s["all"] == {"n": 10, "correct": 5, "accuracy": 0.5}
    assert sum(v["n"] for k, v in s.items() if k != "all") == 10


def test_synth_command_writes_deterministic_files_that_data_chat_reads(tmp_path):
    from z2all.data import chat

    for out in ("a", "b"):
        assert syn.run(syn.Config(out=str(tmp_path / out), n=300, seed=1, heldout_fraction=0.1)) == 0
    for name in ("train.jsonl", "heldout.jsonl", "synth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == sum(meta["counts"]["train"].values()) and set(meta["counts"]["train"]) == set(syn.TASKS)
    cfg = chat.Config(inputs=[str(tmp_path / "a" / "train.jsonl")])
    assert all(chat.to_messages(r, cfg) == r["messages"] for r in rows)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        syn.run(syn.Config(out=str(tmp_path / "c"), n=10))


def test_easy_level_answers_ranges_and_split():
    """--level easy: the same tasks with answers still right, inside its ranges (one-digit operands, numerals
    below 100, 2-3 of the first 5 words, 2-4 spaced characters, one-sentence documents with one of 4 x 4
    titles per language), deterministic, and its held-out prompts never in train; the standard level is
    unchanged by the level machinery."""
    recs = list(syn.generate(1000, seed=2, level="easy"))
    assert recs == list(syn.generate(1000, seed=2, level="easy"))
    assert {r["task"] for r in recs} == set(syn.TASKS) and {r["lang"] for r in recs} == {"en", "zh"}
    easy = syn.LEVELS["easy"]
    for r in recs:
        check_answer(r)
        p, a = syn.prompt_of(r), r["answer"]
        if r["task"] == "arithmetic":
            operands = [int(x) for x in re.findall(r"\d+", p)]
            assert len(operands) == 2 and all(x <= 9 for x in operands) and 0 <= int(a) <= 81
        elif r["task"] == "reverse":
            words = a.split("、" if "、" in a else " ")
            assert easy.list_len == (2, 3) and 2 <= len(words) <= 3
            assert set(words) <= set(syn._EN_WORDS[:5]) | set(syn._ZH_WORDS[:5])
        elif r["task"] == "count":
            s = re.findall(r'"([^"]+)"', p)[1] if r["lang"] == "en" else re.findall(r"“([^”]+)”", p)[0]
            chars = s.split(" ")
            assert 2 <= len(chars) <= 4 and all(len(c) == 1 for c in chars)
            assert "".join(chars) and set("".join(chars)) <= set("".join(easy.count_en + easy.count_zh))
        elif r["task"] == "numeral":
            n = int(a) if a.isdigit() else syn.from_chinese(a)
            assert 0 <= n <= 99
        else:
            body = p.split("\n\n")[2]
            assert body.count(".") + body.count("。") == 1
            first, rest = (a[:-len(a.split(" ")[-1])].split(" ")[1], a.split(" ")[-1]) if a.startswith("The ") \
                else (a[:3], a[3:])
            assert first in syn._EN_ADJ[:4] + syn._ZH_ADJ[:4] and rest in syn._EN_NOUN[:4] + syn._ZH_NOUN[:4]
    parts = syn.split(syn.generate(4000, seed=0, level="easy"), seed=0, fraction=0.1)
    train = {syn.prompt_of(r) for r in parts["train"]}
    held = {syn.prompt_of(r) for r in parts["heldout"]}
    assert held and not train & held
    assert {r["task"] for r in parts["heldout"]} == set(syn.TASKS)
    # standard is the default and does not change with the level code: the first examples stay as they were
    assert list(syn.generate(50, seed=3)) == list(syn.generate(50, seed=3, level="standard"))
    with pytest.raises(UserError, match="choose from"):
        list(syn.generate(1, level="hard"))


def test_synth_command_records_its_level(tmp_path):
    assert syn.run(syn.Config(out=str(tmp_path / "e"), n=200, seed=0, level="easy")) == 0
    meta = json.loads((tmp_path / "e" / "synth.json").read_text())
    assert meta["level"] == "easy"
    rows = [json.loads(x) for x in (tmp_path / "e" / "train.jsonl").read_text().splitlines()]
    assert all(r["task"] != "numeral" or len(r["answer"]) <= 3 for r in rows)
    with pytest.raises(UserError, match="--level"):
        syn.run(syn.Config(out=str(tmp_path / "h"), n=10, level="hard"))
