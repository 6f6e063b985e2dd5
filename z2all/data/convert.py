"""`z2all data convert`: stream raw corpora into unified, cleaned, deduplicated jsonl shards.

    z2all data convert --inputs wikipedia_zh=zh_wiki.jsonl.gz,wikipedia_en=en_wiki.parquet \\
        --inputs ... --out data/converted --txt --workers 2
    z2all data convert --source baike2018qa --inputs baike_qa_train.json,baike_qa_valid.json --out data/c
    z2all data convert --source my_corpus --text-field body --title-field headline --inputs dump/ --out data/c

`--inputs` is a comma list (or a TOML list) of `source=path` or plain `path` (then `--source` names the
source). A path may be a file or a directory (all files under it, sorted: WuDao style). Known sources and
their field mapping are in sources.py; any other source name is generic and needs `--text-field` (plus
optionally `--title-field`, `--desc-field`, `--category-field`, `--category`, `--kind code|prose`).
The format comes from the suffix (`--format` forces one), the compression from the file's magic bytes; see
readers.py for formats and compressions.

Several sources go into one output in one run: inputs are grouped by source (first-appearance order, input
order kept within a source) and numbered in that order, so `gid` is unique over the whole output,
contiguous, and the same on every run and for any `--workers`.

How it runs (pipeline.ordered_map, helps=True): the parent reads inputs and cuts --batch-mb batches (2 MB:
on 2 cores, 96 MB of Chinese prose, 1-2 MB batches ran ~10% faster than 4 MB with one worker and no slower
with two) that convert_worker.py parses, maps, cleans, filters, hashes and serialises: `--workers N` is N
processes doing that, the parent included (it spawns N-1 and runs a batch itself whenever the oldest result is not back
yet; with `--workers 1` everything runs in-process). A batch of a plain (uncompressed) jsonl file is a byte
range aligned to line starts (readers.LineRange) that the worker reads itself; of a compressed one, its raw
lines; of arrays/parquet/txt, the decoded items. Results are applied in order (a bounded number of batches
in flight) and the parent alone deduplicates, numbers and writes, so the output does not depend on timing.

Resume: the parent commits `OUT/.convert_state.json` (input position, next gid, shard lists, skip counts,
and each input's fingerprint: size, mtime, head/tail hash) each time a shard is finished, atomically. A
rerun with the same inputs continues from the last commit: finished inputs are skipped, a half-read input
is reread from the committed item on without rewriting, the unfinished shard of a killed run (a hidden
temp file) is dropped and redone. SIGKILL therefore loses nothing already written. An input that changed
since it was (partly) read is an error naming it (the shards would mix two versions of it); an input whose
read failed may be replaced (the re-downloaded archive). A finished output reruns in no time and prints its
stats again; other inputs or settings for the same --out are refused unless --overwrite.

Adding a source: `--inputs newsrc=...` into a finished output that holds other sources (or the earlier
inputs followed by new sources' inputs) continues it: gids go on from the last one, new documents are
deduplicated against what is there, and the result is byte for byte what one run over all the inputs
would have written. The cleaning and shard settings must be the same; rerunning the addition is a no-op.

Output directory: --out is claimed (z2all.io.claim_output_dir): new, empty, or an earlier convert output;
an input inside it is refused. --overwrite removes exactly the files the state (or, when it is unreadable,
the manifests) lists as written by convert, and directories left empty; anything else stays. Before a shard
is started the state records its file names ("open_shard"), so a resume removes a killed run's unfinished
shard by that record, never by its name: a user's part-00009.jsonl in a source directory stays, and a run
that would write a shard over such a file stops, naming it, before touching it.

No silent failure: a source that yields no records, or whose records are mostly skipped for a reason other
than duplication (more than --max-skipped-fraction, default 0.5: a wrong --text-field, a file in another
format), makes the run fail with the reason and an example, after the output and its stats are written.

Bad input: a malformed line is skipped and counted with its file:line (first `max_examples` kept in the
manifest); invalid UTF-8 is replaced and counted; a missing/empty content field is its own reason; a
broken JSON array drops the rest of that file (counted); a truncated .gz/.zst/.bz2 stops the run with an
error naming the file after committing every complete shard (they stay listed in the manifests).
"""

from __future__ import annotations

import contextlib
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from z2all.config import opt, save_config, section, to_dict
from z2all.data import convert_worker
from z2all.data.clean import CleanConfig
from z2all.data.dedup import HashSet64
from z2all.data.pipeline import fork_is_safe, ordered_map, read_state, write_state
from z2all.data.readers import (
    FOLLOWS,
    FORMATS,
    TXT_MODES,
    InputReader,
    LineRange,
    MalformedJSON,
    detect_format,
    expand_inputs,
    utf8_errors,
    where,
)
from z2all.data.shards import (
    MANIFEST,
    ShardWriter,
    load_shard_hashes,
    read_manifest,
    remove_stale,
    shard_name,
    write_manifest,
)
from z2all.data.sources import KINDS, SOURCES, Source, get_source
from z2all.io import atomic_write_text, claim_output_dir, fingerprint, remove_listed
from z2all.utils import UserError, human_bytes, markdown_table, print0, progress

STATE = ".convert_state.json"
STATE_VERSION = 2  # 2: content hashes are SHA-256 (were blake2b): old dedup files do not mix


@dataclass
class Config:
    inputs: list[str] = opt(None, "inputs: comma list of source=path or path (file or directory)", factory=list)
    out: str = opt("data/converted", "output directory: <out>/<source>/part-*.jsonl + manifest.json")
    source: str = opt("", "source of inputs given without 'source=' (known: " + ", ".join(SOURCES) + ")")
    format: str = opt("", "force the input format instead of guessing it from the suffix",
                      choices=("",) + FORMATS)
    text_field: str = opt("", "generic source: raw field with the main text")
    title_field: str = opt("", "generic source: raw field with the title")
    desc_field: str = opt("", "generic source: raw field with a description / question")
    category_field: str = opt("", "generic source: raw field with the category")
    category: str = opt("", "generic source: fixed category label (default: the source name)")
    kind: str = opt("", "generic source: prose (cleaned) or code (kept byte for byte)", choices=("",) + KINDS)
    txt_mode: str = opt("paragraph", "txt inputs: one document per blank-line block, line, or file (a block or "
                        "file longer than 1,000,000 characters becomes several documents, cut at line ends)",
                        choices=TXT_MODES)
    workers: int = opt(1, "processes parsing and cleaning, this one included: N spawns N-1 helpers (1 = all in "
                       "this process)")
    shard_mb: float = opt(200.0, "roll shards at this many MB of jsonl")
    compress: str = opt("none", "shard compression", choices=("none", "zstd"))
    txt: bool = opt(False, "also write tokenizer-training text files (<out>/<source>/part-*.txt)")
    overwrite: bool = opt(False, "replace an output directory that holds a conversion of other inputs")
    batch_mb: float = opt(2.0, "raw bytes per work batch (memory in flight ~ batch_mb x (2 x workers + 1))")
    max_examples: int = opt(5, "file:line examples kept per skip reason")
    max_skipped_fraction: float = opt(0.5, "fail when more than this share of a source's records is skipped "
                                           "for a reason other than duplication (1 = never fail)")
    clean: CleanConfig = section(CleanConfig, "cleaning, filters and deduplication")

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"workers must be >= 1 (got {self.workers})")
        if self.shard_mb <= 0 or self.batch_mb <= 0:
            raise UserError("shard_mb and batch_mb must be > 0")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise UserError(f"--max-skipped-fraction must be in [0, 1] (got {self.max_skipped_fraction})")
        try:
            self.clean.validate()
        except UserError as e:
            raise UserError(str(e)) from None


@dataclass(frozen=True)
class Unit:
    """One input file of one source: the unit of work, of resume and of ordering."""
    source: Source
    path: Path
    fmt: str


def plan(cfg: Config) -> list[Unit]:
    """Expand --inputs into units, grouped by source in first-appearance order."""
    if not cfg.inputs:
        raise UserError("no inputs: give --inputs source=path[,source=path...] (or --source NAME --inputs path)")
    by_source: dict[str, list[Path]] = {}
    for spec in cfg.inputs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or "\\" in name:
            name, path = cfg.source, spec
            if not name:
                raise UserError(f"input '{spec}' has no source: write it as source=path or give --source "
                                f"(known sources: {', '.join(SOURCES)})")
        if not path.strip():  # Path("") is ".": an empty path would convert the current directory
            raise UserError(f"--inputs '{spec}' has an empty path; write it as source=path/to/file_or_dir")
        by_source.setdefault(name, []).extend(expand_inputs(path.strip()))
    units = []
    for name, paths in by_source.items():
        src = get_source(name, text_field=cfg.text_field, title_field=cfg.title_field, desc_field=cfg.desc_field,
                         category_field=cfg.category_field, category=cfg.category, kind=cfg.kind)
        for p in paths:
            units.append(Unit(src, p, cfg.format or detect_format(p)))
    return units


# ---------------------------------------------------------------- parent side

def _settings(cfg: Config) -> dict:
    """Everything besides the inputs that changes what is written: a resume must not mix two of them.
    (clean.impl is not among them: the C and Python cleaners write the same bytes.)"""
    keys = ("shard_mb", "compress", "txt", "txt_mode", "batch_mb", "text_field", "title_field", "desc_field",
            "category_field", "category", "kind")
    clean = {k: v for k, v in to_dict(cfg.clean).items() if k != "impl"}
    return {**{k: getattr(cfg, k) for k in keys}, "clean": clean}


def _settings_diff(old: dict, new: dict) -> str:
    """The settings that differ, as `--key OLD -> NEW` (dotted for cleaning), for the refusal message."""
    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k != "clean"},
                **{f"clean.{k}": v for k, v in (d.get("clean") or {}).items()}}

    a, b = flat(old or {}), flat(new)
    return ", ".join(f"--{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _fresh_state(units: list[Unit], cfg: Config) -> dict:
    return {"version": STATE_VERSION, "inputs": _signature(units), "settings": _settings(cfg),
            "next_unit": 0, "unit_items": 0, "next_gid": 0,
            "done": False, "sources": {}, "units": [{"documents": 0, "skipped": 0, "status": "pending",
                                                     "fingerprint": fingerprint(u.path)} for u in units]}


def _signature(units: list[Unit]) -> list[dict]:
    return [{"source": u.source.name, "path": str(u.path), "format": u.fmt} for u in units]


def _listed_names(shards: list[dict]) -> list[str]:
    """Every file of a source directory that its shard entries say convert wrote."""
    names = []
    for sh in shards:
        index = int(sh["file"][5:10])
        names += [sh["file"], f".dedup/part-{index:05d}.u64", f".dedup/part-{index:05d}.near.u64"]
        if sh.get("txt"):
            names.append(sh["txt"])
    return names


def remove_conversion(out: Path, state: dict | None) -> None:
    """--overwrite: remove what an earlier conversion wrote (the shards, dedup files, manifests and state
    it lists, and its leftover temp files) and nothing else; directories left empty go too."""
    sources: dict[str, list[dict]] = {}
    if state is not None:
        sources = {name: s.get("shards", []) for name, s in state.get("sources", {}).items()}
    for d in out.iterdir() if out.is_dir() else ():  # a state we cannot read: the manifests still list shards
        if d.is_dir() and d.name not in sources and (d / MANIFEST).is_file():
            try:
                sources[d.name] = read_manifest(d)["shards"]
            except (ValueError, KeyError, TypeError, OSError):
                pass
    for name, shards in sources.items():
        d = out / name
        if not d.is_dir():
            continue
        remove_listed(d, [*_listed_names(shards), MANIFEST])
        remove_stale(d, _uncommitted(state or {}, name))
        for sub in (d / ".dedup", d):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
    remove_listed(out, [STATE, "stats.md", "convert.json"])


def _shard_files(index: int, cfg: Config) -> list[str]:
    """The files convert writes for shard `index` of a source (relative to the source directory)."""
    return [shard_name(index, cfg.compress), *([f"part-{index:05d}.txt"] if cfg.txt else []),
            f".dedup/part-{index:05d}.u64", f".dedup/part-{index:05d}.near.u64"]


def _uncommitted(state: dict, name: str) -> list[str]:
    """The files of the shard of source `name` that the state says was open and no committed shard list
    has: what a killed run wrote (perhaps renamed into place) before its commit."""
    rec = state.get("open_shard")
    if not isinstance(rec, dict) or rec.get("source") != name or not isinstance(rec.get("files"), list):
        return []
    shards = (state.get("sources") or {}).get(name, {}).get("shards", [])
    listed = set(_listed_names(shards))
    return [f for f in rec["files"] if isinstance(f, str) and f not in listed]


def _is_legacy(out: Path) -> bool:
    """A conversion by a z2all from before owner files: it has a convert state."""
    return (out / STATE).is_file()


_FIELD_KEYS = ("text_field", "title_field", "desc_field", "category_field", "category", "kind")


def _size(u: Unit, st: dict) -> int:
    """An input's size: as recorded (an input of an earlier run may be gone), else from the disk."""
    fp = st.get("fingerprint")
    return fp["size"] if fp else u.path.stat().st_size


class _InTheWay(Exception):
    """A file convert did not write sits where its next shard goes (reported as a UserError by run)."""


class Converter:
    """One conversion into `cfg.out`. `units` are this run's inputs; `self.units` may be longer: the inputs of
    earlier runs into the same output when this run adds sources to it (they are done; `self.earlier` of
    them are not inputs of this run and are never opened)."""

    def __init__(self, cfg: Config, units: list[Unit]):
        self.cfg, self.units = cfg, units
        self.earlier = 0
        self.out = Path(cfg.out)
        self.state = self._load_state()
        self.exact = HashSet64()
        self.near = HashSet64() if cfg.clean.near_dedup else None
        self.writer: ShardWriter | None = None
        self.writer_source: str | None = None
        self.pos = (self.state["next_unit"], self.state["unit_items"])

    # -- state
    def _load_state(self) -> dict:
        path = self.out / STATE
        try:
            state = read_state(path)
        except UserError:
            if not self.cfg.overwrite:
                raise
            state = {}
        if state is None:
            return _fresh_state(self.units, self.cfg)
        if not self.cfg.overwrite and state.get("version") == STATE_VERSION and (added := self._add_sources(state)):
            self._check_shards(added)
            return added
        same_inputs = state.get("inputs") == _signature(self.units)
        if same_inputs and state.get("settings") == _settings(self.cfg) and state.get("version") == STATE_VERSION:
            changed = self._changed_input(state)
            if changed is None:
                try:
                    self._check_shards(state)
                    return state
                except UserError:
                    if not self.cfg.overwrite:
                        raise
            if not self.cfg.overwrite:
                raise UserError(f"input {changed.path} changed since {self.out} was converted from it (its size, "
                                f"time or content differ), so the shards would mix old and new text; put the "
                                f"original back to continue, or rerun with --overwrite to convert again")
        elif not self.cfg.overwrite:
            what = ("an older version of this converter" if state.get("version") != STATE_VERSION else
                    f"other settings (that run / this one: {_settings_diff(state.get('settings'), _settings(self.cfg))}"
                    f"; give that run's values to continue it)" if same_inputs else "other inputs")
            hint = (" (to add new sources to it, give only their inputs, with the same settings)"
                    if what == "other inputs" else "")
            raise UserError(f"{self.out} holds a conversion of {what} ({path}){hint}; use another --out, or "
                            f"--overwrite to replace it")
        remove_conversion(self.out, state or None)
        return _fresh_state(self.units, self.cfg)

    def _earlier_units(self, sig: list[dict]) -> list[Unit]:
        """Units of an earlier run's inputs, for their source names and kinds only: never read again."""
        kinds = {}
        for name in dict.fromkeys(e["source"] for e in sig):
            try:
                kinds[name] = read_manifest(self.out / name).get("kind", "prose")
            except (OSError, ValueError, AttributeError):
                kinds[name] = "prose"
        return [Unit(SOURCES.get(e["source"]) or Source(e["source"], content="(earlier run)",
                                                        kind=kinds[e["source"]]), Path(e["path"]), e["format"])
                for e in sig]

    def _add_sources(self, state: dict) -> dict | None:
        """This run adds new sources to a finished conversion (or reruns such an addition): the state that
        continues its gids and dedup hashes, else None. Accepted: the earlier inputs followed by inputs of
        new sources, only inputs of new sources, or exactly the inputs an earlier addition gave. The
        cleaning and shard settings must be those of the earlier run (field options may differ: they only
        concern the new generic sources)."""
        old, new = state["inputs"], _signature(self.units)
        if old == new:
            return None
        for k in state.get("added_at", []):  # the same addition again: a resume or a finished rerun
            if old[k:] == new:
                self.units, self.earlier = self._earlier_units(old[:k]) + self.units, k
                return None
        same = {k: v for k, v in state["settings"].items() if k not in _FIELD_KEYS} == \
            {k: v for k, v in _settings(self.cfg).items() if k not in _FIELD_KEYS}
        names = {e["source"] for e in old}
        if not (state.get("done") and same):
            return None
        if new[: len(old)] == old and all(e["source"] not in names for e in new[len(old):]):
            extra = self.units[len(old):]
        elif all(e["source"] not in names for e in new):
            extra = self.units
            self.units, self.earlier = self._earlier_units(old) + self.units, len(old)
        else:
            return None
        fresh = _fresh_state(extra, self.cfg)
        state.update(inputs=_signature(self.units), settings=_settings(self.cfg), done=False,
                     units=state["units"] + fresh["units"], added_at=state.get("added_at", []) + [len(old)])
        print0(f"data convert: adding {', '.join(dict.fromkeys(u.source.name for u in extra))} to {self.out} "
               f"(gids from {state['next_gid']:,} on, deduplicated against what is there)")
        return state

    def _changed_input(self, state: dict) -> Unit | None:
        """The first input already (partly) read whose fingerprint differs from the one recorded, else None.
        Inputs not read yet, and one whose read failed (a truncated archive the user re-downloads, the
        documented recovery), take their current fingerprint. A state without fingerprints (an older z2all)
        cannot be checked."""
        next_unit, items = state["next_unit"], state["unit_items"]
        for i, (u, st) in enumerate(zip(self.units, state["units"])):
            read = (i < next_unit or (i == next_unit and items > 0)) and not st["status"].startswith("error")
            if "fingerprint" not in st or i < self.earlier:
                continue
            now = fingerprint(u.path)
            if not read:
                st["fingerprint"] = now
            elif now != st["fingerprint"]:
                return u
        return None

    def _check_shards(self, state: dict) -> None:
        """Every committed shard (and its dedup hashes) is still there at its committed size: a resume would
        otherwise build on, and a finished output would report, files that are gone or cut."""
        for name, s in state["sources"].items():
            for sh in s["shards"]:
                p = self.out / name / sh["file"]
                size = p.stat().st_size if p.is_file() else None
                if size != sh["bytes"]:
                    what = "is missing" if size is None else f"has {size:,} bytes, not {sh['bytes']:,}"
                    raise UserError(f"shard {p} {what} (listed in {self.out / STATE}); restore it, or rerun with "
                                    f"--overwrite to convert again")
                h = self.out / name / ".dedup" / f"part-{int(sh['file'][5:10]):05d}.u64"
                if (h.stat().st_size if h.is_file() else -1) != 8 * sh["count"]:
                    raise UserError(f"{h} is missing or does not hold {sh['count']} hashes (one per document of "
                                    f"{p.name}); rerun with --overwrite to convert again")

    def _restore(self) -> None:
        """After a kill: drop files no commit lists, reload dedup hashes, rewrite manifests."""
        for name in dict.fromkeys(u.source.name for u in self.units):
            shards = self.state["sources"].get(name, {}).get("shards", [])
            remove_stale(self.out / name, _uncommitted(self.state, name))
            for sh in shards:
                index = int(sh["file"][5:10])
                self.exact.add_all(load_shard_hashes(self.out / name, index))
                if self.near is not None:
                    self.near.add_all(load_shard_hashes(self.out / name, index, "near"))
        self._write_manifests()

    def _src(self, name: str) -> dict:
        return self.state["sources"].setdefault(name, {"shards": [], "documents": 0, "skipped": {},
                                                       "repaired": {}, "examples": {}})

    def _commit(self) -> None:
        self.state["next_unit"], self.state["unit_items"] = self.pos
        write_state(self.out / STATE, self.state)
        self._write_manifests()

    def _write_manifests(self) -> None:
        for name, s in self.state["sources"].items():
            src = next(u.source for u in self.units if u.source.name == name)
            inputs = [{"path": str(u.path), "format": u.fmt, "raw_bytes": _size(u, st), **st}
                      for u, st in zip(self.units, self.state["units"]) if u.source.name == name]
            write_manifest(self.out / name, {
                "source": name, "kind": src.kind, "documents": s["documents"],
                "bytes": sum(sh["bytes"] for sh in s["shards"]),
                "skipped": s["skipped"], "repaired": s["repaired"], "examples": s["examples"],
                "shards": s["shards"], "inputs": inputs, "complete": self.state["done"]})

    # -- shards
    def _finish_shard(self) -> None:
        if self.writer is None:
            return
        if self.writer.count:
            info = self.writer.finish()
            s = self._src(self.writer_source)
            s["shards"].append(info)
        else:
            self.writer.abort()
        self.state.pop("open_shard", None)  # listed now (or never written): the next commit drops the record
        self.writer = None

    def _writer_for(self, name: str) -> ShardWriter:
        if self.writer is not None and self.writer_source != name:
            self._finish_shard()
            self._commit()
        if self.writer is None:
            index = len(self._src(name)["shards"])
            files = _shard_files(index, self.cfg)
            d = self.out / name
            in_way = [d / f for f in files if not f.startswith(".") and ((d / f).exists() or (d / f).is_symlink())]
            if in_way:  # not ours (a killed run's shard was removed by _restore): never written over
                raise _InTheWay(f"{in_way[0]} is in the way: `z2all data convert` did not write it (no state or "
                                f"manifest lists it) and its next shard of '{name}' has that name; move it out of "
                                f"{d} and rerun the same command to continue ({self.out / STATE} keeps what is done)")
            # recorded and committed before the first byte: a resume after a kill removes these files by this
            # record, not by their names (all documents applied so far are in finished shards: consistent)
            self.state["open_shard"] = {"source": name, "index": index, "files": files}
            self._commit()
            self.writer = ShardWriter(self.out / name, index, compress=self.cfg.compress, txt=self.cfg.txt)
            self.writer_source = name
        return self.writer

    # -- the pipeline
    def _tasks(self):
        u0, start = self.state["next_unit"], self.state["unit_items"]
        batch_bytes = int(self.cfg.batch_mb * 2**20)
        for u in range(u0, len(self.units)):
            unit = self.units[u]
            reader = InputReader(unit.path, unit.fmt, txt_mode=self.cfg.txt_mode, ranges=True)
            self._reader = reader
            before = utf8_errors()
            try:
                for first, items in reader.batches(start if u == u0 else 0, batch_bytes=batch_bytes):
                    # arrays and txt are decoded here, jsonl lines in the workers, which count their own
                    # repairs: with --workers 1 they run in this process, and their count must not be taken
                    # for the parent's (it was: counted twice, once as "near file:item N")
                    fixed = utf8_errors() - before
                    before += fixed
                    if fixed and reader.kind == "records":  # queued before its batch: a commit after it has it
                        yield ("repaired", u, fixed, where(unit.path, "records", first))
                    kind = "range" if isinstance(items, LineRange) else reader.kind
                    yield ("batch", u, first, kind, items, str(unit.path))
            except MalformedJSON as e:
                yield ("malformed", u, e.index, str(e), where(unit.path, "records", e.index))
            yield ("end", u)

    def _apply(self, result: tuple) -> None:
        tag, u = result[0], result[1]
        name = self.units[u].source.name
        s = self._src(name)
        ustat = self.state["units"][u]
        ustat["status"] = "partial"
        if tag == "end":
            ustat["status"] = "done"
            self.pos = (u + 1, 0)
            return
        if tag == "repaired":
            _, _, count, at = result
            self._count(s, "invalid UTF-8 replaced", count, [f"near {at}"], table="repaired")
            return
        if tag == "malformed":
            _, _, index, msg, at = result
            self._count(s, "malformed JSON array (rest of file dropped)", 1, [f"{at} ({msg})"])
            ustat["skipped"] += 1
            return
        _, _, first, n, (bodies, texts, hashes, nears), skipped, repaired, kind = result
        if first == FOLLOWS:  # a byte range cut after the previous one: numbered here, in order
            first = self.pos[1]
        writer = self._writer_for(name)
        path = self.units[u].path
        for table, found in (("skipped", skipped), ("repaired", repaired)):
            for reason, (count, ex) in found.items():
                self._count(s, reason, count, [where(path, kind, first + i) + detail for i, detail in ex],
                            table=table)
                if table == "skipped":
                    ustat["skipped"] += count
        kept = len(bodies)
        dups = near_dups = 0
        if self.cfg.clean.dedup or self.near is not None:
            fresh = self.exact.add_new(hashes) if self.cfg.clean.dedup else [True] * kept
            sel = []
            for i, ok in enumerate(fresh):
                if not ok:
                    dups += 1
                elif self.near is not None and self._near_seen(nears[i]):
                    near_dups += 1
                else:
                    sel.append(i)
            if len(sel) < kept:  # the columns of the documents that stay
                kept = len(sel)
                bodies = [bodies[i] for i in sel]
                texts = None if texts is None else [texts[i] for i in sel]
                hashes = array("Q", [hashes[i] for i in sel])
                nears = None if nears is None else [nears[i] for i in sel]
        writer.write(self.state["next_gid"], bodies, texts, hashes, nears)
        self.state["next_gid"] += kept
        s["documents"] += kept
        ustat["documents"] += kept
        if dups:
            self._count(s, "duplicate", dups, [])
            ustat["skipped"] += dups
        if near_dups:
            self._count(s, "near duplicate", near_dups, [])
            ustat["skipped"] += near_dups
        self.pos = (u, first + n)
        if writer.size >= self.cfg.shard_mb * 2**20:
            self._finish_shard()
            self._commit()

    def _near_seen(self, keys: list[int]) -> bool:
        """A document is a near duplicate when any LSH band key was seen; its keys are added either way."""
        fresh = self.near.add_new(keys)
        return not all(fresh)

    def _count(self, s: dict, reason: str, count: int, examples: list[str], table: str = "skipped") -> None:
        s[table][reason] = s[table].get(reason, 0) + count
        if examples:
            ex = s["examples"].setdefault(reason, [])
            ex.extend(examples[: max(0, self.cfg.max_examples - len(ex))])

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.state["done"]:
            print0(f"data convert: {self.out} is complete (rerun of the same inputs), nothing to do")
            return self.state
        self._restore()
        sources = [u.source for u in self.units]
        sizes = [_size(u, st) for u, st in zip(self.units, self.state["units"])]
        total, done_bytes = sum(sizes), sum(sizes[: self.state["next_unit"]])
        bar = progress(total=total, initial=done_bytes, desc="convert", unit="B", unit_scale=True)
        self._reader = None
        last_pos = 0

        def submitted(tag: tuple) -> None:
            nonlocal last_pos
            if tag[0] == "end":
                bar.update(sizes[tag[1]] - last_pos)
                last_pos = 0
            else:
                pos = self._reader.position() if self._reader else 0
                bar.update(max(0, pos - last_pos))
                last_pos = pos

        # a batch travels as its payload with a small tag; markers ("end", "repaired", ...) are their own tag
        jobs = (((t[0], t[1]), t) if t[0] == "batch" else (t, None) for t in self._tasks())
        error: UserError | None = None
        in_way: _InTheWay | None = None
        results = ordered_map(convert_worker.work, jobs, workers=cfg.workers, helps=True,
                              initializer=convert_worker.init,
                              initargs=(sources, cfg.clean, cfg.txt, cfg.max_examples), submitted=submitted,
                              start="fork" if fork_is_safe() else "spawn")
        try:
            with contextlib.closing(results):
                for tag, result in results:
                    self._apply(tag if result is None else result)
        except _InTheWay as e:  # a user's file where the next shard goes: stop, nothing of theirs touched
            in_way = e
        except UserError as e:  # ReadError from the inputs (truncated archive, unreadable parquet), after
            error = e  # every batch before it was applied
        finally:
            bar.close()
        if in_way is not None:
            raise UserError(str(in_way)) from None
        self._finish_shard()
        if error is not None:
            u = self.pos[0]
            if u < len(self.units):
                self.state["units"][u]["status"] = f"error: {error}"
            self._commit()
            n = sum(len(s["shards"]) for s in self.state["sources"].values())
            raise UserError(f"{error}; {n} complete shard(s) were written and are listed in the manifests under "
                            f"{self.out}; replace the file and rerun the same command to continue from there "
                            f"(dropping it from --inputs means a new conversion: --overwrite)")
        self.state["done"] = True
        self.pos = (len(self.units), 0)
        self._commit()
        return self.state


def stats_table(state: dict, units: list[Unit], out: Path) -> tuple[list[str], list[list]]:
    """The stats table (the layout of the original llm-zero2all converter): one row per source plus a total."""
    headers = ["source", "inputs", "raw size", "jsonl size", "shards", "txt size", "documents", "skipped"]
    rows, tot = [], [0, 0, 0, 0, 0, 0, 0]
    for name, s in state["sources"].items():
        us = [(u, st) for u, st in zip(units, state["units"]) if u.source.name == name]
        raw = sum(_size(u, st) for u, st in us)
        jsonl = sum(sh["bytes"] for sh in s["shards"])
        txt = sum(sh.get("txt_bytes", 0) for sh in s["shards"])
        skipped = sum(s["skipped"].values())
        vals = [len(us), raw, jsonl, len(s["shards"]), txt, s["documents"], skipped]
        tot = [a + b for a, b in zip(tot, vals)]
        rows.append([name, vals[0], human_bytes(raw), human_bytes(jsonl), vals[3], human_bytes(txt), vals[5],
                     vals[6]])
    rows.append(["total", tot[0], human_bytes(tot[1]), human_bytes(tot[2]), tot[3], human_bytes(tot[4]), tot[5],
                 tot[6]])
    return headers, rows


_DEDUP_REASONS = ("duplicate", "near duplicate")


def _hint(reason: str) -> str:
    if reason.startswith(("missing field", "empty field")):
        return "is the text in another field? (--text-field for a generic source, or another --source)"
    if reason.startswith(("malformed JSON", "blank line", "not a JSON object")):
        return "is the file in another format? (--format)"
    return "see the examples in the manifest"


def check_output(state: dict, cfg: Config, out: Path) -> None:
    """A conversion that produced nothing, or skipped most of a source, is a failure, not a success: the
    usual causes are a wrong field name or format. Duplicates do not count (a source may repeat another)."""
    for name, s in state["sources"].items():
        bad = {k: v for k, v in s["skipped"].items() if k not in _DEDUP_REASONS}
        nbad = sum(bad.values())
        seen = s["documents"] + nbad
        if not s["documents"] and not any(s["skipped"].values()):
            raise UserError(f"source '{name}': its inputs hold no records (empty files?); nothing was converted "
                            f"for it (output in {out})")
        if nbad and nbad > cfg.max_skipped_fraction * seen:
            top = max(bad, key=bad.get)
            ex = s["examples"].get(top, [])
            raise UserError(f"source '{name}': {nbad:,} of {seen:,} records were skipped, most as '{top}'"
                            + (f" (e.g. {ex[0]})" if ex else "") + f"; {_hint(top)}. Fix the inputs or options "
                            f"and rerun with --overwrite, or accept it with --max-skipped-fraction "
                            f"(now {cfg.max_skipped_fraction}; details in {out / name / MANIFEST})")
    if not any(s["documents"] for s in state["sources"].values()) and state["sources"]:
        raise UserError(f"no documents were converted; the skip counts are in the manifests under {out}")


def run(cfg: Config) -> int:
    """The command, holding --out (z2all.io.dir_lock): a second process writing it meanwhile is refused."""
    from z2all.io import dir_lock

    with dir_lock(cfg.out, "data convert"):
        return _run(cfg)


def _run(cfg: Config) -> int:
    cfg.validate()
    units = plan(cfg)
    t0 = time.perf_counter()
    claim_output_dir(cfg.out, "data convert", protect=[u.path for u in units], legacy=_is_legacy)
    conv = Converter(cfg, units)
    state = conv.run()
    units = conv.units  # with the inputs of earlier runs when this one added sources

    headers, rows = stats_table(state, units, conv.out)
    table = markdown_table(headers, rows)
    atomic_write_text(conv.out / "stats.md", table + "\n")
    save_config(cfg, conv.out / "convert.json", stats={"headers": headers, "rows": rows},
                inputs=_signature(units), next_gid=state["next_gid"])
    print0(table)
    check_output(state, cfg, conv.out)
    print0(f"data convert: {rows[-1][6]:,} documents, {rows[-1][7]:,} skipped, "
           f"{time.perf_counter() - t0:.1f} s -> {conv.out}")
    return 0
