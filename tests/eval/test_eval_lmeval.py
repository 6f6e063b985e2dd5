"""A real client: lm-evaluation-harness's `hf` model on our Hugging Face export, with a local task YAML
(`dataset_path: json` on a file this test writes; nothing is downloaded), must choose what `z2all eval`
chooses on the same items: the same per-choice log-likelihoods (within 1e-4), per-item predictions,
acc, acc_norm and acc_bytes. Items cover trailing-space contexts (the boundary rule), Chinese choices
(characters vs bytes), multi-token continuations and a context longer than the window (left truncation).

Skips when lm_eval is not importable (`pip install 'llm-zero2all[lmeval]'`)."""

from __future__ import annotations

import pytest
from eval_helpers import demo_docs, write_jsonl

pytestmark = pytest.mark.slow


def test_lm_eval_hf_backend_agrees_with_z2all_eval(ckpt, lm, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval.models.huggingface",
                        reason="lm-eval with its hf backend is not installed (pip install 'llm-zero2all[lmeval]')")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from z2all.eval import formats
    from z2all.eval.run import Config, Task, evaluate_task
    from z2all.model.hf_compat import export_hf

    hf_dir = export_hf(ckpt, tmp_path / "hf")
    zh = demo_docs(n=4, chars=1200)
    rows = [{"context": "Question: What color is the sky?\nAnswer: ", "choices": ["blue", "green", "red"], "answer": 0},
            {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
            {"context": "中国的首都是", "choices": ["北京", "上海市", "Paris"], "answer": 0},
            {"context": zh[0][:200], "choices": [zh[0][200:220], zh[1][200:220], zh[2][200:220]], "answer": 0},
            {"context": zh[3], "choices": ["long context", "truncated from the left"], "answer": 1},
            {"context": "The cat sat on the", "choices": ["mat", "moon"], "answer": 0}]
    data = write_jsonl(tmp_path / "items.jsonl", rows)
    assert len(lm.encode(rows[4]["context"])) > lm.window and all(len(d) > 220 for d in zh)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "z2all_mc.yaml").write_text(
        "task: z2all_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n", encoding="utf-8")
    res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
                          tasks=["z2all_mc"], task_manager=TaskManager(include_path=str(tasks_dir)),
                          log_samples=True, batch_size=4, cache_requests=False)
    samples = sorted(res["samples"]["z2all_mc"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    loaded = formats.load("jsonl", data)
    items = formats.build_items(loaded)
    ours = evaluate_task(lm, Task("jsonl/items", "mc", items, [], len(items)), Config())
    assert ours["n"] == len(rows)
    for mine, other in zip(ours["items"], theirs):
        assert mine["ll"] == pytest.approx(other, abs=1e-4)
    metrics = res["results"]["z2all_mc"]
    for name in ("acc", "acc_norm", "acc_bytes"):
        assert ours[name] == pytest.approx(metrics[f"{name},none"]), name
    # per item: the same choice under every rule
    for mine, s in zip(ours["items"], samples):
        assert mine["pred"] == max(range(len(s["filtered_resps"])), key=lambda i: (s["filtered_resps"][i][0], -i))
