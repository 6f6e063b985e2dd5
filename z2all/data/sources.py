"""Corpus adapters: one small declarative `Source` per known corpus (DESIGN.md's table) plus a generic one.

A source names the raw fields that become the record's title, content, desc and category; every raw field
it does not map is kept in `others`. `kind` picks the cleaning: "prose" is normalised, "code" is written
byte for byte. Adding a corpus is one line in `SOURCES`:

    SOURCES["my_corpus"] = Source("my_corpus", title="headline", content="body", category="news")

`to_record(raw)` returns a record, or a string naming why the raw item was skipped (a missing or empty
content field, a raw item that is not an object); the converter counts skips under that reason. Its ids are
-1 until the shard writer numbers the kept records: `serialise(record)` is the record's jsonl line without
the `PLACEHOLDER` those ids make, and shards.ShardWriter puts `{"gid":G,"id":I,` in its place.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from z2all.data.schema import Record
from z2all.utils import UserError

KINDS = ("prose", "code")
PLACEHOLDER = b'{"gid":-1,"id":-1,'  # how the ids of a record from to_record serialise
_SKIP = len(PLACEHOLDER)


def serialise(record: dict) -> bytes:
    """A record from `to_record` as its jsonl line (newline included) less the leading PLACEHOLDER. The
    slice copies the line into a bytes of its own size: orjson's output buffer is larger (RSS held ~3.7x
    the line until copied). TypeError for text that does not encode (lone surrogates)."""
    body = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    if not body.startswith(PLACEHOLDER):  # a record not made by to_record: the writer would misnumber it
        raise ValueError(f"record line does not start with {PLACEHOLDER!r}: {body[:40]!r}")
    return body[_SKIP:]


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return orjson.dumps(value, default=str).decode("utf-8")


@dataclass(frozen=True)
class Source:
    name: str  # also the record's data_src and the output sub-directory
    content: str  # raw field holding the main text (required: missing or empty -> skipped)
    title: str = ""  # raw field names; "" = the corpus has none
    desc: str = ""
    category_field: str = ""  # a raw field holding the category ...
    category: str = ""  # ... or a fixed category label for the whole corpus
    kind: str = "prose"  # "prose" (cleaned) or "code" (never touched)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"source '{self.name}': kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if not self.content:
            raise UserError(f"source '{self.name}' needs a content field (--text-field)")
        object.__setattr__(self, "_mapped", self.mapped)  # frozen: cached by hand for to_record

    @property
    def mapped(self) -> frozenset[str]:
        return frozenset(f for f in (self.content, self.title, self.desc, self.category_field) if f)

    def to_record(self, raw) -> Record | str:
        # on the per-document hot path: one dict literal (make_record's field order), no keyword calls
        if not isinstance(raw, dict):
            return "not a JSON object"
        content = raw.get(self.content)
        if content is None:
            return f"missing field '{self.content}'"
        if type(content) is not str:
            content = _as_text(content)
        if not content or content.isspace():  # = not content.strip(), without copying the text
            return f"empty field '{self.content}'"
        mapped = self._mapped
        title = _as_text(raw.get(self.title)) if self.title else ""
        desc = _as_text(raw.get(self.desc)) if self.desc else ""
        category = _as_text(raw.get(self.category_field)) if self.category_field else ""
        return {"gid": -1, "id": -1, "data_src": self.name, "category": category or self.category, "title": title,
                "content": content, "desc": desc, "others": {k: v for k, v in raw.items() if k not in mapped}}


# The corpora of DESIGN.md. Categories "python_code"/"code" are what schema.is_code recognises.
SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("baike2018qa", content="answer", title="title", desc="desc", category_field="category"),
    Source("news2016zh", content="content", title="title", desc="desc"),
    Source("webtext2019zh", content="content", title="title", desc="desc", category_field="topic"),
    Source("wikipedia_zh", content="text", title="title", category="wikipedia_zh"),
    Source("wikipedia_en", content="text", title="title", category="wikipedia_en"),
    Source("github_python", content="content", title="path", category="python_code", kind="code"),
    Source("zhihu_kol", content="RESPONSE", title="INSTRUCTION", category="zhihu"),
    Source("wudao", content="content", title="title", category_field="dataType"),
)}


def get_source(name: str, *, text_field: str = "", title_field: str = "", desc_field: str = "",
               category_field: str = "", category: str = "", kind: str = "") -> Source:
    """A known source by name (its mapping is fixed; field options are ignored), or a generic one for any
    other name, which needs `text_field`."""
    if name in SOURCES:
        return SOURCES[name]
    if not text_field:
        raise UserError(f"unknown source '{name}'; known sources: {', '.join(SOURCES)}; for another corpus "
                        f"name it freely and give --text-field (and optionally --title-field, --desc-field, "
                        f"--category-field, --category, --kind)")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"source name '{name}' must be letters, digits, '_' or '-' (it names a directory)")
    if kind == "code":
        # a record's training text is chosen by its category (schema.record_text): only a code category keeps
        # the content alone, byte for byte; with the source's name as its category a --title-field (a path)
        # was put in front of the code
        from z2all.data.schema import CODE_CATEGORIES

        if category_field or (category and category not in CODE_CATEGORIES):
            raise UserError(f"source '{name}': --kind code takes its category from the kind (one of "
                            f"{', '.join(sorted(CODE_CATEGORIES))}); drop --category-field/--category or give one "
                            f"of those")
        category = category or "code"
    return Source(name, content=text_field, title=title_field, desc=desc_field, category_field=category_field,
                  category=category or name, kind=kind or "prose")
