"""Each public format, read from a tiny fixture written in that exact layout (column names, answer
encodings, the original and the Hugging Face row shapes), with its bad rows skipped and counted by
file:line; few-shot assembly and the dev-split lookup."""

from __future__ import annotations

import json

import pytest
from eval_helpers import write_jsonl

from z2all.eval import formats


def _csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_mmlu_csv_no_header_letters_and_bad_rows(tmp_path):
    p = _csv(tmp_path / "data" / "test" / "college_biology_test.csv",
             '"What is 2+2?\n(think)",3,4,5,6,B\n'
             "Capital of France?,Rome,Paris,Oslo,Bern,b\n"
             "Bad letter?,1,2,3,4,E\n"
             "Too few,1,2,3,B\n")
    got = formats.load("mmlu", p)
    assert [d.gold for d in got.docs] == [1, 1]
    assert got.docs[0].text == "What is 2+2?\n(think)\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert got.docs[0].choices == ["A", "B", "C", "D"] and got.docs[0].delimiter == " "
    assert got.description == "The following are multiple choice questions (with answers) about college biology.\n\n"
    assert len(got.skipped) == 2
    assert got.skipped[0].startswith(f"{p}:4: answer 'E'") and f"{p}:5:" in got.skipped[1]
    # the quoted question spans two lines: the row's location is where it ends
    assert got.docs[0].where == f"{p}:2"


def test_ceval_and_cmmlu_csv_headers(tmp_path):
    ce = _csv(tmp_path / "ceval" / "val" / "law_val.csv",
              "id,question,A,B,C,D,answer,explanation\n"
              "0,下列哪项正确？,甲,乙,丙,丁,C,\n"
              "1,无答案的题,甲,乙,丙,丁,,\n")
    got = formats.load("ceval", ce)
    assert [d.gold for d in got.docs] == [2]
    assert got.docs[0].text.endswith("D. 丁\n答案：")
    assert got.description.startswith("以下是中国关于law的单项选择题")
    assert "no answer" in got.skipped[0] and got.skipped[0].startswith(f"{ce}:3")

    cm = _csv(tmp_path / "cmmlu" / "test" / "anatomy.csv",
              ",Question,A,B,C,D,Answer\n0,人体最大的器官是？,心,肝,皮肤,肺,C\n1,缺列,甲,乙,丙,丁,X\n")
    got = formats.load("cmmlu", cm)
    assert [d.gold for d in got.docs] == [2] and len(got.skipped) == 1
    assert got.description.startswith("以下是关于anatomy的单项选择题")
    wrong = _csv(tmp_path / "w.csv", "id,prompt,A,B,C,D,answer\n0,q,a,b,c,d,A\n")
    assert "missing column(s) question" in formats.load("ceval", wrong).skipped[0]


def test_hellaswag_jsonl_preprocessing_and_labels(tmp_path):
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "ctx": "x", "split": "val", "split_type": "indomain", "source_id": "v",
           "endings": [", the man adds wax.", "Go out [title] Scrape the  ice [step].", ", the man stops.",
                       ", he leaves."],
           "label": 3}
    p = write_jsonl(tmp_path / "hellaswag_val.jsonl", [row, {**row, "label": "1"}, "{not json",
                                                         {**row, "label": 9}, {**row, "endings": None}])
    got = formats.load("hellaswag", p)
    assert [d.gold for d in got.docs] == [3, 1]
    assert got.docs[0].text == "Removing ice from car: Then, the man writes over the snow. Then"
    assert got.docs[0].choices[1] == "Go out. Scrape the ice ."
    assert [s.split(": ")[0] for s in got.skipped] == [f"{p}:3", f"{p}:4", f"{p}:5"]
    assert "malformed JSON" in got.skipped[0]


def test_arc_original_and_hf_rows(tmp_path):
    orig = {"id": "Mercury_1", "question": {"stem": "Which is a metal?", "choices": [
        {"text": "wood", "label": "A"}, {"text": "iron", "label": "B"}, {"text": "glass", "label": "C"}]},
        "answerKey": "B"}
    hf = {"id": "x", "question": "2 + 2 = ?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]},
          "answerKey": "2"}
    p = write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [orig, hf, {**hf, "answerKey": "E"}, {"id": 1}])
    got = formats.load("arc", p)
    assert [(d.text, d.choices, d.gold) for d in got.docs] == [
        ("Question: Which is a metal?\nAnswer:", ["wood", "iron", "glass"], 1),
        ("Question: 2 + 2 = ?\nAnswer:", ["3", "4", "5", "6"], 1)]
    assert "answerKey 'E'" in got.skipped[0] and "missing field" in got.skipped[1]


def test_generic_jsonl_answer_encodings_and_gen(tmp_path):
    rows = [{"context": "c", "choices": ["x", "y", "z"], "answer": 2},
            {"context": "c", "choices": ["x", "y"], "answer": "B"},
            {"context": "c", "choices": ["x", "y"], "answer": "y"},
            {"context": "c", "choices": ["x", "y"], "answer": 5},
            {"context": "c", "choices": "xy", "answer": 0}]
    got = formats.load("jsonl", write_jsonl(tmp_path / "g.jsonl", rows))
    assert [d.gold for d in got.docs] == [2, 1, 1] and len(got.skipped) == 2
    gen = formats.load("gen", write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                                                 {"question": "q", "answer": ["a", "b"]},
                                                                 {"answer": "x"}]))
    assert gen.generative and [d.answers for d in gen.docs] == [["2"], ["a", "b"]] and len(gen.skipped) == 1


def test_fields_of_the_wrong_json_type_are_skipped_and_counted(tmp_path):
    """A field of the wrong JSON type (a number where a string goes, null, a bool label) is a bad row like a
    missing field: skipped with its file:line and a reason naming the field, never a crash of the run."""
    hs = {"activity_label": "a", "ctx_a": "x", "ctx_b": "y", "endings": ["p", "q"], "label": 0}
    p = write_jsonl(tmp_path / "hs.jsonl", [hs, {**hs, "endings": [1, 2]}, {**hs, "ctx_b": None},
                                            {**hs, "activity_label": 7}, {**hs, "label": True},
                                            {**hs, "label": 1.5}, {**hs, "label": ""}])
    got = formats.load("hellaswag", p)
    assert len(got.docs) == 1 and got.docs[0].text == "a: x Y"
    assert [s.split(": ")[0] for s in got.skipped] == [f"{p}:{n}" for n in range(2, 8)]
    assert "endings must be a list of at least 2 strings" in got.skipped[0]
    assert "ctx_b must be a string, got null" in got.skipped[1] and "activity_label" in got.skipped[2]
    assert all("label" in s for s in got.skipped[3:])

    arc = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    p = write_jsonl(tmp_path / "arc.jsonl", [arc, {**arc, "choices": {"text": [1, 2], "label": ["A", "B"]}},
                                             {**arc, "choices": ["a", "b"]}, {**arc, "question": None},
                                             {**arc, "choices": {"text": ["a", "b"], "label": ["A"]}},
                                             {"question": {"stem": "q", "choices": ["a", "b"]}, "answerKey": "A"},
                                             {"question": {"stem": "q", "choices": [{"text": None, "label": "A"},
                                                                                    {"text": "b", "label": "B"}]},
                                              "answerKey": "A"}])
    got = formats.load("arc", p)
    assert len(got.docs) == 1 and [s.split(": ")[0] for s in got.skipped] == [f"{p}:{n}" for n in range(2, 8)]

    mc = {"context": "c", "choices": ["x", "y"], "answer": 0}
    p = write_jsonl(tmp_path / "mc.jsonl", [mc, {**mc, "context": None}, {**mc, "choices": ["x", 2]}])
    got = formats.load("jsonl", p)
    assert len(got.docs) == 1 and "context must be a string, got null" in got.skipped[0]
    p = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p", "answer": [{"a": 1}]},
                                             {"prompt": "p", "answer": None}, {"prompt": 3, "answer": "a"}])
    got = formats.load("gen", p)
    assert len(got.docs) == 1 and [s.split(": ")[0] for s in got.skipped] == [f"{p}:{n}" for n in range(2, 5)]
    # every doc that loaded builds items of plain strings (what the scoring concatenates and tokenizes)
    for fmt, name in (("hellaswag", "hs"), ("arc", "arc"), ("jsonl", "mc")):
        items = formats.build_items(formats.load(fmt, tmp_path / f"{name}.jsonl"), 1)
        assert all(isinstance(c, str) for it in items for c in [it.context, *it.continuations])


def test_fewshot_from_dev_is_seeded_and_dev_path_found(tmp_path):
    test = _csv(tmp_path / "data" / "test" / "astro_test.csv", "q1,a,b,c,d,A\nq2,a,b,c,d,B\n")
    dev = _csv(tmp_path / "data" / "dev" / "astro_dev.csv", "".join(f"d{i},a,b,c,d,C\n" for i in range(5)))
    assert formats.dev_path_for(test) == dev
    loaded, shots = formats.load("mmlu", test), formats.load("mmlu", dev).docs
    a = formats.build_items(loaded, 2, shots, seed=7)
    b = formats.build_items(loaded, 2, shots, seed=7)
    assert [i.context for i in a] == [i.context for i in b]
    ctx = a[0].context
    assert ctx.startswith(loaded.description) and ctx.count("\nAnswer: C\n\n") == 2
    assert ctx.endswith("q1\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert a[0].continuations == [" A", " B", " C", " D"] and a[0].choices == ["A", "B", "C", "D"]
    # without a dev split the shots come from the other items, never the item itself
    own = formats.build_items(loaded, 1, None, seed=1)
    assert "q2" in own[0].context.split("\n\n")[1] and "q1" in own[1].context.split("\n\n")[1]
    assert json.dumps([i.context for i in own])  # plain strings


def test_task_specs_directories_dev_splits_and_limits(tmp_path):
    import pytest

    from z2all.eval.run import Config, load_tasks
    from z2all.utils import UserError

    for subj in ("astro", "bio"):
        _csv(tmp_path / "data" / "test" / f"{subj}_test.csv", "q1,a,b,c,d,A\nq2,a,b,c,d,B\nq3,a,b,c,d,X\n")
        _csv(tmp_path / "data" / "dev" / f"{subj}_dev.csv", "d0,a,b,c,d,C\n")
    got = load_tasks(Config(tasks=[f"mmlu={tmp_path / 'data' / 'test'}"], fewshot=1, limit=1))
    assert [(t.name, len(t.items), t.total, len(t.skipped), t.chance) for t in got] == [
        ("mmlu/astro_test", 1, 3, 1, 0.25), ("mmlu/bio_test", 1, 3, 1, 0.25)]
    assert "d0\nA. a" in got[0].items[0].context  # the shot came from the dev split found next to it
    spec = f"mmlu={tmp_path / 'data/test/bio_test.csv'}@{tmp_path / 'data/dev/astro_dev.csv'}"
    explicit = load_tasks(Config(tasks=[spec], fewshot=1))
    assert "about astro" not in explicit[0].items[0].context and "d0" in explicit[0].items[0].context
    with pytest.raises(UserError, match="no .csv file"):
        load_tasks(Config(tasks=[f"ceval={tmp_path}"]))


def test_chance_is_the_mean_over_items_of_one_over_their_choices(tmp_path):
    """Items with 4, 3, 3, 2 and 2 choices: a uniform guess scores (1/4 + 2/3 + 2/2) / 5 = 0.383, not
    1/max = 0.25 (which made a model look better than chance when it was not)."""
    from z2all.eval.run import Config, load_tasks

    rows = [{"context": f"q{i}", "choices": [f"c{j}" for j in range(n)], "answer": 0}
            for i, n in enumerate((4, 3, 3, 2, 2))]
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task,) = load_tasks(Config(tasks=[f"jsonl={p}"]))
    assert task.chance == pytest.approx((1 / 4 + 2 / 3 + 2 / 2) / 5)
    (first2,) = load_tasks(Config(tasks=[f"jsonl={p}"], limit=2))  # over the items scored
    assert first2.chance == pytest.approx((1 / 4 + 1 / 3) / 2)


def test_an_empty_task_file_is_refused_and_too_few_shots_are_said(tmp_path, capsys):
    """An empty task file is refused before anything loads (it was "every row was skipped" after results
    were written); --fewshot above what the file can give is said (it silently used fewer)."""
    from z2all.eval.run import Config, load_tasks
    from z2all.utils import UserError

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl holds no rows"):
        load_tasks(Config(tasks=[f"jsonl={tmp_path / 'empty.jsonl'}"]))
    rows = [{"context": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(5)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_tasks(Config(tasks=[f"jsonl={tmp_path / 'mc.jsonl'}"], fewshot=10))
    assert "note: jsonl/mc: --fewshot 10 but only 4 other example(s) to draw from: 4-shot" in capsys.readouterr().out
