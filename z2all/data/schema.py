"""The unified record `{gid,id,data_src,category,title,content,desc,others}` and record -> training text.

Every converted corpus is one JSON object per line with exactly these fields (see DESIGN.md). The text a
tokenizer or a model sees is built from a record by `record_text` alone, so the tokenizer and the token
files always agree on what a document is.
"""

from __future__ import annotations

from typing import Any, TypedDict

FIELDS = ("gid", "id", "data_src", "category", "title", "content", "desc", "others")
CODE_CATEGORIES = frozenset({"python_code", "code"})


class Record(TypedDict):
    gid: int
    id: int
    data_src: str
    category: str
    title: str
    content: str
    desc: str
    others: dict[str, Any]


def make_record(*, data_src: str, category: str = "", title: str = "", content: str = "", desc: str = "",
                others: dict[str, Any] | None = None, gid: int = -1, id: int = -1) -> Record:
    """A record with every field present and typed (ids are filled in by the shard writer)."""
    return Record(gid=gid, id=id, data_src=data_src, category=category or "", title=title or "",
                  content=content or "", desc=desc or "", others=others or {})


def is_code(record: dict) -> bool:
    return record.get("category", "") in CODE_CATEGORIES


def record_text(record: dict) -> str:
    """The training text of a record.

    Code: the file content alone, byte for byte (a path line would teach the model a fake syntax).
    Prose: title, desc and content as paragraphs, skipping empty parts and a title the content already
    starts with (wiki dumps often repeat it), so `title + "\\n" + desc + "\\n" + content`.
    """
    content = record.get("content", "") or ""
    if is_code(record):
        return content
    parts = []
    title = (record.get("title", "") or "").strip()
    desc = (record.get("desc", "") or "").strip()
    if title and not content.lstrip().startswith(title):
        parts.append(title)
    if desc and desc != title:
        parts.append(desc)
    if content:
        parts.append(content)
    return "\n".join(parts)
