"""A deterministic, licence-free instruction set for supervised fine-tuning of small models, with exact
answers and exact-match scoring. `z2all data synth` writes it as OpenAI-`messages` jsonl:

    z2all data synth --out data/synth --n 20000 --seed 0
    z2all data chat --inputs data/synth/train.jsonl --tokenizer data/tok --out data/sft

Tasks (`TASKS`), each with English and Chinese prompts (ranges of `--level standard`, the default):
    arithmetic   small-number + - × ("What is 37 + 45?" / "37 加 45 等于多少？")
    reverse      reverse a list of 3-6 English or Chinese words
    count        how many times a character occurs in a short string
    numeral      Arabic <-> Chinese numerals, 0..99,999 (1005 <-> 一千零五, 10 <-> 十, 20000 <-> 二万)
    title        the title of a short generated document (first line, "Title: ...", "# ...", 《...》)
`--level easy` (`LEVELS`) keeps the tasks and narrows the ranges to what a ~5M-parameter model learns in a few
CPU minutes (`z2all demo --chat` uses it): operands 0..9 (× 2..5), numerals 0..99, 2-3 of 5 words, 2-4
space-separated characters to count in, one-sentence documents titled by one of 4 adjectives x 4 nouns.

Every record: {"id", "task", "lang", "messages": [(system,) user, assistant], "answer"}; the assistant's content
is the answer. Example i is a pure function of (seed, i) (its own `random.Random`), and tasks take turns
(i mod the number of tasks), so a larger --n extends a smaller one. Split: a record goes to the held-out set
when blake2b(seed, user prompt) falls below --heldout-fraction, so the same prompt is never in both splits
and the held-out set of a small --n is a subset of that of a larger one; repeated prompts are written once
per split.

Output (`--out`, claimed for "data synth"): train.jsonl, heldout.jsonl and synth.json (counts per task and
split, seed, tasks, version), each written atomically.

Scoring: `exact_match(prediction, answer)` compares after `normalize_answer` (Unicode NFKC, so full-width
digits and commas equal ASCII ones; whitespace collapsed; trailing ".。!！" dropped; case folded);
`score(records, predictions)` gives accuracy per task.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from z2all.config import opt
from z2all.io import atomic_open, atomic_write_json, claim_output_dir
from z2all.utils import UserError, markdown_table, print0

TASKS = ("arithmetic", "reverse", "count", "numeral", "title")
VERSION = 1
COMMAND = "data synth"

_EN_WORDS = ("apple", "river", "stone", "cloud", "green", "music", "table", "light", "ocean", "tiger", "paper",
             "window", "garden", "silver", "rabbit", "yellow", "bridge", "candle", "forest", "pencil", "winter",
             "orange", "castle", "planet", "summer", "dragon", "button", "mirror", "letter", "island")
_ZH_WORDS = ("苹果", "河流", "石头", "云朵", "绿色", "音乐", "桌子", "灯光", "海洋", "老虎", "纸张", "窗户",
             "花园", "银色", "兔子", "黄色", "桥梁", "蜡烛", "森林", "铅笔", "冬天", "橙子", "城堡", "星球",
             "夏天", "龙", "按钮", "镜子", "信件", "岛屿")
_EN_ADJ = ("Silent", "Golden", "Hidden", "Broken", "Distant", "Frozen", "Gentle", "Lonely", "Bright", "Ancient",
           "Little", "Wandering")
_EN_NOUN = ("Harbor", "Garden", "Mountain", "Letter", "Bridge", "Forest", "Lantern", "River", "Island", "Clock",
            "Window", "Road")
_ZH_ADJ = ("安静的", "金色的", "隐藏的", "遥远的", "冰冻的", "温柔的", "孤独的", "明亮的", "古老的", "小小的")
_ZH_NOUN = ("港口", "花园", "山峰", "信", "桥", "森林", "灯笼", "河", "岛", "钟", "窗", "路")
_EN_SENT = ("The morning was cold and the streets were empty.", "Nobody remembered who had built it.",
            "Children played there every summer.", "A small dog waited by the door.",
            "The old keeper wrote everything down in a notebook.", "Rain fell for three days without stopping.",
            "Visitors came from far away to see it.", "At night the wind sang through the trees.")
_ZH_SENT = ("早晨很冷，街上空无一人。", "没有人记得是谁建造了它。", "每年夏天孩子们都在那里玩耍。",
            "一只小狗在门口等着。", "老看守把一切都写在笔记本上。", "雨连续下了三天。", "游客从远方赶来看它。",
            "夜里风在树林间歌唱。")
_SYSTEM = {"en": ("You are a helpful assistant.", "Answer with the result only."),
           "zh": ("你是一个乐于助人的助手。", "只回答结果。")}
_DIGITS = "零一二三四五六七八九"


# ---------------------------------------------------------------- Chinese numerals

def _section(x: int) -> str:
    """0 < x < 10,000 in Chinese numerals, a 零 for each run of inner zeros."""
    out, zero = [], False
    for digit, unit in zip(f"{x:04d}", ("千", "百", "十", "")):
        d = int(digit)
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out.append("零")
            zero = False
        out.append(_DIGITS[d] + unit)
    return "".join(out)


def to_chinese(n: int) -> str:
    """0 <= n < 10**8 as a Chinese numeral: 10 十, 15 十五, 110 一百一十, 1005 一千零五, 10010 一万零一十."""
    if not 0 <= n < 10**8:
        raise ValueError(f"to_chinese covers 0..99,999,999, not {n}")
    if n == 0:
        return "零"
    high, low = divmod(n, 10000)
    s = _section(high) + "万" if high else ""
    if low:
        if high and low < 1000:
            s += "零"
        s += _section(low)
    return "十" + s[2:] if s.startswith("一十") else s


def from_chinese(s: str) -> int:
    """The inverse of `to_chinese` (also accepts 两 and a leading 一十)."""
    digits = {c: i for i, c in enumerate(_DIGITS)} | {"两": 2}
    units = {"十": 10, "百": 100, "千": 1000}
    total, section, num = 0, 0, 0
    for c in s:
        if c in digits:
            num = digits[c]
        elif c in units:
            section += (num or 1) * units[c]
            num = 0
        elif c == "万":
            total += (section + num) * 10000
            section, num = 0, 0
        else:
            raise ValueError(f"not a Chinese numeral: {s!r}")
    return total + section + num


# ---------------------------------------------------------------- the tasks

@dataclass(frozen=True)
class Level:
    """The ranges of one difficulty level (every task draws the same random calls at every level, only
    the ranges differ, so `standard` stays byte-identical to the set before levels existed)."""
    add_max: int = 99                          # + and - operands 0..add_max
    mul_max: int = 12                          # × operands 2..mul_max
    words: int = 30                            # reverse: the first `words` of each word list
    list_len: tuple[int, int] = (3, 6)         # reverse: list length
    count_en: tuple[str, ...] = ("abcde", "xyz", "mnop")
    count_zh: tuple[str, ...] = ("天地人", "山水花", "日月星云")
    count_len: tuple[int, int] = (4, 12)       # count: string length
    count_sep: str = ""                        # count: between the characters of the string
    numeral_digits: int = 5                    # numeral: 0 .. 10**numeral_digits - 1
    sentences: tuple[int, int] = (2, 3)        # title: body sentences
    title_words: int = 12                      # title: the first `title_words` adjectives and nouns


LEVELS = {
    "standard": Level(),
    # what a ~5M-parameter model learns in a few CPU minutes (docs/performance.md, "SFT on the synthetic
    # tasks"): one-digit operands, numerals below 100, 2-3 words from 5, 2-4 spaced characters (a byte-level
    # BPE of a small corpus merges "abcab" into "abc" + "ab", which hides the letters to count), one-sentence
    # documents whose title is one of 4 x 4 per language (with 12 x 12 the model guesses a title of the right
    # shape instead of copying it)
    "easy": Level(add_max=9, mul_max=5, words=5, list_len=(2, 3), count_en=("ab", "xyz"), count_zh=("天地", "山水花"),
                  count_len=(2, 4), count_sep=" ", numeral_digits=2, sentences=(1, 1), title_words=4),
}


def _arithmetic(rng: random.Random, lang: str, lv: Level) -> tuple[str, str]:
    op = rng.choice("+-×")
    if op == "×":
        a, b = rng.randint(2, lv.mul_max), rng.randint(2, lv.mul_max)
        result = a * b
    else:
        a, b = rng.randint(0, lv.add_max), rng.randint(0, lv.add_max)
        if op == "-" and a < b:
            a, b = b, a
        result = a + b if op == "+" else a - b
    if lang == "en":
        prompt = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"))
    else:
        words = {"+": "加", "-": "减", "×": "乘以"}
        prompt = rng.choice(("{a} {w} {b} 等于多少？", "计算 {a} {op} {b}。", "{a} {op} {b} = ？"))
        prompt = prompt.replace("{w}", words[op])
    return prompt.format(a=a, b=b, op=op), str(result)


def _reverse(rng: random.Random, lang: str, lv: Level) -> tuple[str, str]:
    zh_words = rng.random() < 0.5
    words = rng.sample((_ZH_WORDS if zh_words else _EN_WORDS)[:lv.words], rng.randint(*lv.list_len))
    sep = "、" if zh_words else " "
    shown = sep.join(words)
    if lang == "en":
        prompt = f"Reverse the order of these words: {shown}"
    else:
        prompt = f"把下面的词倒过来排列：{shown}"
    return prompt, sep.join(reversed(words))


def _count(rng: random.Random, lang: str, lv: Level) -> tuple[str, str]:
    alphabet = rng.choice(lv.count_en if rng.random() < 0.5 else lv.count_zh)
    s = lv.count_sep.join(rng.choice(alphabet) for _ in range(rng.randint(*lv.count_len)))
    c = rng.choice(alphabet)
    if lang == "en":
        prompt = f'How many times does "{c}" appear in "{s}"?'
    else:
        prompt = f"“{s}”里有几个“{c}”？"
    return prompt, str(s.count(c))


def _numeral(rng: random.Random, lang: str, lv: Level) -> tuple[str, str]:
    digits = rng.randint(1, lv.numeral_digits)
    n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
    zh = to_chinese(n)
    if rng.random() < 0.5:
        prompt = f"Write {n} in Chinese numerals." if lang == "en" else f"把 {n} 写成中文数字。"
        return prompt, zh
    prompt = f"Write the Chinese numeral {zh} in Arabic digits." if lang == "en" else f"把 {zh} 写成阿拉伯数字。"
    return prompt, str(n)


def _title(rng: random.Random, lang: str, lv: Level) -> tuple[str, str]:
    if rng.random() < 0.5:
        title = f"The {rng.choice(_EN_ADJ[:lv.title_words])} {rng.choice(_EN_NOUN[:lv.title_words])}"
        body = " ".join(rng.sample(_EN_SENT, rng.randint(*lv.sentences)))
        head = rng.choice(("{t}", "Title: {t}", "# {t}")).format(t=title)
    else:
        title = rng.choice(_ZH_ADJ[:lv.title_words]) + rng.choice(_ZH_NOUN[:lv.title_words])
        body = "".join(rng.sample(_ZH_SENT, rng.randint(*lv.sentences)))
        head = rng.choice(("《{t}》", "标题：{t}", "# {t}")).format(t=title)
    doc = f"{head}\n\n{body}"
    if lang == "en":
        prompt = f"What is the title of the following document?\n\n{doc}"
    else:
        prompt = f"下面这篇短文的标题是什么？\n\n{doc}"
    return prompt, title


_MAKERS = {"arithmetic": _arithmetic, "reverse": _reverse, "count": _count, "numeral": _numeral, "title": _title}


def example(i: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, level: str = "standard") -> dict:
    """Example i of the set (a pure function of seed, i, the task list and the level)."""
    task = tasks[i % len(tasks)]
    rng = random.Random((seed & 0xFFFFFFFF) << 40 | i)
    lang = rng.choice(("en", "zh"))
    prompt, answer = _MAKERS[task](rng, lang, LEVELS[level])
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.25:
        messages.insert(0, {"role": "system", "content": rng.choice(_SYSTEM[lang])})
    return {"id": f"synth-{seed}-{i}", "task": task, "lang": lang, "messages": messages, "answer": answer}


def generate(n: int, seed: int = 0, tasks: Iterable[str] = TASKS, level: str = "standard") -> Iterator[dict]:
    """Examples 0..n-1 (see `example`)."""
    tasks = check_tasks(tasks)
    if level not in LEVELS:
        raise UserError(f"--level {level}: choose from {', '.join(LEVELS)}")
    for i in range(n):
        yield example(i, seed, tasks, level)


def check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown or not tasks:
        raise UserError(f"--tasks {','.join(unknown) or '(empty)'}: choose from {', '.join(TASKS)}")
    return tasks


def prompt_of(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def is_heldout(record: dict, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{prompt_of(record)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


def split(records: Iterable[dict], seed: int = 0, fraction: float = 0.05) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...]}, by prompt hash, each prompt once per split."""
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for r in records:
        p = prompt_of(r)
        if p in seen:
            continue
        seen.add(p)
        out["heldout" if is_heldout(r, seed, fraction) else "train"].append(r)
    return out


# ---------------------------------------------------------------- scoring

_TRAILING = re.compile(r"[.。!！]+$")


def normalize_answer(s: str) -> str:
    s = unicodedata.normalize("NFKC", str(s)).strip()
    s = " ".join(s.split())
    return _TRAILING.sub("", s).strip().casefold()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def score(records: Iterable[dict], predictions: Iterable[str]) -> dict[str, dict]:
    """{task: {"n", "correct", "accuracy"}} plus "all", for predictions aligned with records."""
    out: dict[str, dict] = {}
    for r, p in zip(records, predictions, strict=True):
        for key in (r["task"], "all"):
            s = out.setdefault(key, {"n": 0, "correct": 0})
            s["n"] += 1
            s["correct"] += exact_match(p, r["answer"])
    for s in out.values():
        s["accuracy"] = s["correct"] / s["n"]
    return out


# ---------------------------------------------------------------- the command

@dataclass
class Config:
    out: str = opt("data/synth", "output directory for train.jsonl, heldout.jsonl and synth.json")
    n: int = opt(20000, "examples to generate (before the split and de-duplication)")
    seed: int = opt(0, "seed: the same seed gives byte-identical files")
    heldout_fraction: float = opt(0.05, "share of prompts that go to heldout.jsonl")
    tasks: list[str] = opt(None, "tasks to include (default all: " + ", ".join(TASKS) + ")", factory=list)
    level: str = opt("standard", "difficulty: standard (two-digit + and -, numerals to 99,999, 3-6 words...) or "
                     "easy (one-digit operands, numerals 0..99, 2-3 of 5 words, 2-4 characters to count, "
                     "one-sentence documents: what a few-million-parameter model learns in minutes)",
                     choices=tuple(LEVELS))


def run(cfg: Config) -> int:
    if cfg.n < 1:
        raise UserError(f"--n must be >= 1 (got {cfg.n})")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be in [0, 1) (got {cfg.heldout_fraction})")
    tasks = check_tasks(cfg.tasks or TASKS)
    out = claim_output_dir(cfg.out, COMMAND)
    if cfg.level not in LEVELS:
        raise UserError(f"--level {cfg.level}: choose from {', '.join(LEVELS)}")
    parts = split(generate(cfg.n, cfg.seed, tasks, cfg.level), cfg.seed, cfg.heldout_fraction)
    counts = {}
    for name, records in parts.items():
        with atomic_open(out / f"{name}.jsonl", "wb") as f:
            for r in records:
                f.write(orjson.dumps(r) + b"\n")
        counts[name] = {t: sum(r["task"] == t for r in records) for t in tasks}
    atomic_write_json(out / "synth.json", {"version": VERSION, "seed": cfg.seed, "n": cfg.n, "level": cfg.level,
                                           "tasks": list(tasks),
                                           "heldout_fraction": cfg.heldout_fraction, "counts": counts,
                                           "repeated_prompts_dropped": cfg.n - sum(map(len, parts.values()))})
    print0(markdown_table(["task", "train", "heldout"], [[t, counts["train"][t], counts["heldout"][t]]
                                                         for t in tasks]))
    print0(f"data synth: {len(parts['train']):,} train / {len(parts['heldout']):,} held-out examples "
           f"({cfg.n - sum(map(len, parts.values())):,} repeated prompts dropped) -> {Path(out)}")
    return 0
