"""Loaders for the public evaluation formats users bring, turned into one shape (`Doc`), and few-shot prompt
assembly (`build_items`). Nothing is downloaded: every loader reads a local file.

Formats (`FORMATS`) and what each reads; prompts follow lm-evaluation-harness's task YAMLs so scores are
comparable with published lm-eval numbers:

    mmlu       csv, no header: question,A,B,C,D,answer (letter). The hendrycks `data/{dev,val,test}/
               <subject>_{dev,val,test}.csv` layout. Prompt "Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:",
               choices " A".." D", description "The following are multiple choice questions (with
               answers) about <subject>.\\n\\n".
    ceval      csv with header id,question,A,B,C,D,answer[,explanation] (C-Eval's `{dev,val,test}/
               <subject>_{dev,val,test}.csv`; test rows have no answer and are skipped). Prompt ends "答案：".
    cmmlu      csv with header ,Question,A,B,C,D,Answer (first column an unnamed index; CMMLU's
               `{dev,test}/<subject>.csv`). Prompt ends "答案：".
    hellaswag  jsonl: {activity_label, ctx_a, ctx_b, endings[4], label} (label int or "0".."3"; rowanz's
               original files and the HF dataset rows both). lm-eval's preprocessing ([title] -> ". ",
               bracketed tags removed, double spaces collapsed).
    arc        jsonl: AI2's original {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} or
               the HF rows {"question": str, "choices": {"text": [], "label": []}, "answerKey"}. Prompt
               "Question: ..\\nAnswer:", the choice texts as continuations.
    jsonl      generic multiple choice: {"context", "choices": [...], "answer"}; answer is the index, a
               letter (A = 0) or the text of the right choice. Continuation = " " + choice, as lm-eval's
               default target_delimiter.
    gen        generative exact match: {"context" (or "prompt"/"question"), "answer": str or [str, ...]}.

A row that cannot be used (malformed JSON, a missing field, a field of the wrong JSON type, an answer
letter outside the choices) is skipped and counted with its file:line (`Loaded.skipped`); the report
says how many items were scored.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from z2all.utils import UserError

FORMATS = ("mmlu", "ceval", "cmmlu", "hellaswag", "arc", "jsonl", "gen")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FEWSHOT_SEP = "\n\n"


@dataclass
class Doc:
    """One question. `text` is the query without description or shots; the continuations scored are
    `delimiter + choice`; `target` is what a few-shot example shows as its answer."""
    text: str
    choices: list[str]
    gold: int  # index into choices; for `gen` docs 0 and `answers` holds the accepted strings
    where: str
    delimiter: str = " "
    answers: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.answers[0] if self.answers else self.choices[self.gold]


@dataclass
class Loaded:
    docs: list[Doc]
    description: str = ""
    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    generative: bool = False


@dataclass
class Item:
    """A scorable question: the full context (description + shots + query) and the continuations."""
    context: str
    continuations: list[str]
    choices: list[str]  # without the delimiter: acc_norm's lengths are taken on these, as lm-eval does
    gold: int
    where: str
    answers: list[str] = field(default_factory=list)


class _Bad(Exception):
    pass


def _letter(value, n: int) -> int:
    s = str(value).strip().upper()
    if len(s) == 1 and s in LETTERS[:n]:
        return LETTERS.index(s)
    raise _Bad(f"answer {value!r} is not one of {', '.join(LETTERS[:n])}")


def _subject(path: Path) -> str:
    stem = re.sub(r"_(dev|val|test)$", "", path.stem)
    return stem.replace("_", " ")


def _abcd(q: str, opts: list[str], tail: str) -> str:
    return q.strip() + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(opts)) + "\n" + tail


# ---------------------------------------------------------------- csv formats

def _csv_rows(path: Path, header: bool):
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        head = None
        try:
            for row in reader:
                if header and head is None:
                    head = [h.strip() for h in row]
                    continue
                yield reader.line_num, head, row
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{path}:{reader.line_num}: not a readable csv file ({e})") from None


def _load_csv(path: Path, fmt: str) -> Loaded:
    docs, skipped = [], []
    subject = _subject(path)
    if fmt == "mmlu":
        desc = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        tail, cols = "Answer:", None
    elif fmt == "ceval":
        desc = f"以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n"
        tail, cols = "答案：", ("question", "answer")
    else:
        desc = f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"
        tail, cols = "答案：", ("Question", "Answer")
    for line, head, row in _csv_rows(path, header=cols is not None):
        where = f"{path}:{line}"
        try:
            if cols is None:
                if len(row) != 6:
                    raise _Bad(f"expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
                q, opts, ans = row[0], row[1:5], row[5]
            else:
                rec = dict(zip(head, row))
                missing = [c for c in (cols[0], "A", "B", "C", "D", cols[1]) if c not in rec]
                if missing:
                    raise _Bad(f"missing column(s) {', '.join(missing)} (header: {','.join(head)})")
                q, opts, ans = rec[cols[0]], [rec[c] for c in "ABCD"], rec[cols[1]]
            if not ans.strip():
                raise _Bad("no answer (a test split without labels?)")
            docs.append(Doc(_abcd(q, opts, tail), list("ABCD"), _letter(ans, 4), where))
        except _Bad as e:
            skipped.append(f"{where}: {e}")
    return Loaded(docs, desc, skipped)


# ---------------------------------------------------------------- jsonl formats

def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _json_type(v) -> str:
    """How a JSON value's type reads in a message about a row ("got null", "got a number")."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _str(r: dict, key: str) -> str:
    """r[key] as a string; any other JSON type makes the row a skipped one (the formatting below calls
    string methods on these fields, which would otherwise crash the whole run on one bad row)."""
    v = r[key]
    if not isinstance(v, str):
        raise _Bad(f"field {key} must be a string, got {_json_type(v)}")
    return v


def _strings(v, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(x, str) for x in v):
        raise _Bad(f"{what} must be a list of at least 2 strings")
    return list(v)


def _doc_hellaswag(r: dict, where: str) -> Doc:
    activity, ctx_a, ctx_b = _str(r, "activity_label"), _str(r, "ctx_a"), _str(r, "ctx_b")
    endings = _strings(r["endings"], "endings")
    raw = r["label"]
    # int, or "0".."3" as the HF rows have it; a bool or a float is not an index (int() would take them)
    label = raw if isinstance(raw, int) and not isinstance(raw, bool) else (
        int(raw) if isinstance(raw, str) and raw.strip().isdigit() else None)
    if label is None:
        raise _Bad(f"label {raw!r} is not an ending index (a test split without labels?)")
    if not 0 <= label < len(endings):
        raise _Bad(f"label {label} is outside the {len(endings)} endings")
    return Doc(_hellaswag_pre(activity + ": " + ctx_a + " " + ctx_b.capitalize()),
               [_hellaswag_pre(e) for e in endings], label, where)


def _doc_arc(r: dict, where: str) -> Doc:
    q = r["question"]
    if isinstance(q, dict):  # AI2's original layout
        stem, ch = q["stem"], q["choices"]
        if not isinstance(ch, list) or not all(isinstance(c, dict) for c in ch):
            raise _Bad("question.choices must be a list of {text, label} objects")
        texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
    else:
        stem, ch = q, r["choices"]
        if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
            raise _Bad("choices must be an object {text: [...], label: [...]}")
        texts, labels = ch["text"], ch["label"]
    if not isinstance(stem, str):
        raise _Bad(f"the question must be a string, got {_json_type(stem)}")
    texts = _strings(texts, "the choice texts")
    if len(labels) != len(texts) or not all(isinstance(x, (str, int)) for x in labels):
        raise _Bad("every choice needs a label (a letter or a number)")
    labels = [str(x) for x in labels]
    key = str(r["answerKey"]).strip()
    if key not in labels:
        raise _Bad(f"answerKey {key!r} is not one of the labels {', '.join(labels)}")
    return Doc(f"Question: {stem}\nAnswer:", texts, labels.index(key), where)


def _doc_generic(r: dict, where: str) -> Doc:
    choices = _strings(r["choices"], "choices")
    context = _str(r, "context")
    ans = r["answer"]
    if isinstance(ans, bool):
        raise _Bad(f"answer {ans!r} is neither an index, a letter nor a choice")
    if isinstance(ans, int):
        if not 0 <= ans < len(choices):
            raise _Bad(f"answer {ans} is outside the {len(choices)} choices")
        gold = ans
    elif isinstance(ans, str) and ans in choices:
        gold = choices.index(ans)
    elif isinstance(ans, str) and ans.strip().isdigit() and 0 <= int(ans) < len(choices):
        gold = int(ans)
    else:
        gold = _letter(ans, len(choices))
    return Doc(context, choices, gold, where)


def _doc_gen(r: dict, where: str) -> Doc:
    ctx = next((r[k] for k in ("context", "prompt", "question") if k in r), None)
    if not isinstance(ctx, str):
        raise _Bad("needs a string field context (or prompt / question)")
    ans = r["answer"]
    answers = [ans] if isinstance(ans, (str, int, float)) else ans
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise _Bad("answer must be a string or a non-empty list of strings")
    return Doc(ctx, [], 0, where, answers=[str(a) for a in answers])


_JSONL = {"hellaswag": _doc_hellaswag, "arc": _doc_arc, "jsonl": _doc_generic, "gen": _doc_gen}


def _load_jsonl(path: Path, fmt: str) -> Loaded:
    docs, skipped = [], []
    make = _JSONL[fmt]
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    r = json.loads(line)
                    if not isinstance(r, dict):
                        raise _Bad("not a JSON object")
                    docs.append(make(r, where))
                except json.JSONDecodeError as e:
                    skipped.append(f"{where}: malformed JSON ({e.msg})")
                except KeyError as e:
                    skipped.append(f"{where}: missing field {e}")
                except (_Bad, TypeError, ValueError) as e:
                    skipped.append(f"{where}: {e}")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    return Loaded(docs, "", skipped, generative=fmt == "gen")


def load(fmt: str, path: str | Path) -> Loaded:
    """Read one task file of format `fmt`."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown task format '{fmt}'; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"task file {path} not found")
    return _load_csv(path, fmt) if fmt in ("mmlu", "ceval", "cmmlu") else _load_jsonl(path, fmt)


def dev_path_for(path: Path) -> Path | None:
    """The dev split next to a test/val file in the MMLU / C-Eval / CMMLU layouts, if it exists:
    data/test/x_test.csv -> data/dev/x_dev.csv; test/x.csv -> dev/x.csv."""
    parts = list(path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("test", "val"):
            name = re.sub(r"_(test|val)(\.\w+)$", r"_dev\2", parts[-1])
            cand = Path(*parts[:i], "dev", *parts[i + 1:-1], name)
            return cand if cand.is_file() else None
    return None


def build_items(loaded: Loaded, k: int = 0, dev: list[Doc] | None = None, seed: int = 1234) -> list[Item]:
    """Items with `k` few-shot examples drawn from `dev` (else from the other docs of the same file, never
    the item itself) by one random.Random(seed) advanced item by item, so a run is reproducible."""
    rng = random.Random(seed)
    pool = dev if dev is not None else loaded.docs
    items = []
    for i, d in enumerate(loaded.docs):
        shots = ""
        if k > 0:
            cand = pool if dev is not None else [x for j, x in enumerate(pool) if j != i]
            picks = rng.sample(cand, min(k, len(cand)))
            shots = "".join(s.text + s.delimiter + s.target + FEWSHOT_SEP for s in picks)
        ctx = loaded.description + shots + d.text
        items.append(Item(ctx, [d.delimiter + c for c in d.choices], list(d.choices), d.gold, d.where,
                          list(d.answers)))
    return items
