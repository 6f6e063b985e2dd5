"""The one console script, `z2all <stage> [<command>] [options]`: the only place that knows every stage.

    z2all --help                      list the stages
    z2all data convert --help         every option of one command, with its help text
    z2all train --config configs/demo_cpu.toml --optim.lr=1e-3
    torchrun --standalone --nproc_per_node=2 -m z2all train --config configs/demo_cpu.toml

Each command is a module exposing a dataclass `Config` and `run(cfg)`. Options are generated from the
dataclass: every leaf is `--section.key VALUE` (also `--section.key=VALUE`); top-level leaves also get a
dashed alias (`--memory-budget`). `--config FILE.toml` loads a preset; precedence is
defaults < TOML < command line. Modules are imported only when their command runs (fast `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import sys
import typing
from dataclasses import dataclass

from z2all.config import leaves, load_config, strip_optional
from z2all.utils import UserError


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # defines `Config` (a dataclass) and `run(cfg)`


# stage -> Command, or stage -> (help, {command -> Command}). A test pins this table.
STAGES: dict[str, Command | tuple[str, dict[str, Command]]] = {
    "data": ("corpus preparation: raw corpora -> unified shards -> token files", {
        "convert": Command("stream raw corpora into unified jsonl shards (clean, dedup, manifest)",
                           "z2all.data.convert"),
        "tokenize": Command("shards + tokenizer -> memory-mapped train/val token files", "z2all.data.tokenize"),
        "chat": Command("conversations + tokenizer -> SFT token, loss-mask and example-index files", "z2all.data.chat"),
        "prefs": Command("preference pairs + tokenizer -> DPO token, mask and pair files", "z2all.data.prefs"),
        "synth": Command("generate the synthetic zh/en instruction set (train + held-out jsonl)",
                         "z2all.data.synthetic"),
    }),
    "tokenizer": ("byte-level BPE tokenizer", {
        "train": Command("train a tokenizer (backends: z2all, hf, spm) in bounded memory", "z2all.tokenizer.train"),
        "eval": Command("bytes/token and chars/token per domain vs other tokenizers", "z2all.tokenizer.evaluate"),
    }),
    "train": Command("pretrain a Z2all model (one CPU to many GPUs through torchrun)", "z2all.train.pretrain"),
    "eval": Command("score checkpoints: bits per byte per domain, multiple choice (lm-eval's rules), exact match",
                    "z2all.eval.run"),
    "sft": Command("fine-tune a pretrained checkpoint on chat data (packing, loss on assistant tokens)",
                   "z2all.train.sft"),
    "dpo": Command("align a checkpoint on preference pairs (DPO / IPO, LoRA optional)", "z2all.train.dpo"),
    "chat": Command("multi-turn terminal chat with a checkpoint (streaming; /reset /system /params)",
                    "z2all.serve.chat"),
    "serve": Command("OpenAI-compatible HTTP server with continuous batching and a chat page", "z2all.serve.api"),
    "generate": Command("sample text from a checkpoint with a KV cache", "z2all.model.generate"),
    "export": ("export a checkpoint to other ecosystems", {
        "hf": Command("write a standard Hugging Face LlamaForCausalLM directory", "z2all.model.hf_compat"),
        "gguf": Command("write a GGUF file for llama.cpp / Ollama (f32, f16, bf16, q8_0)", "z2all.model.gguf"),
    }),
    "bench": ("benchmarks that print markdown tables (ours vs the peers, same machine)", {
        "data": Command("conversion MB/s and RSS vs a plain stdlib converter; tokenization vs tokenizers and tiktoken",
                        "z2all.bench.data"),
        "tokenizer": Command("training time, RSS and bytes/token: ours vs HF vs sentencepiece",
                             "z2all.bench.tokenizer"),
        "patterns": Command("split patterns (ours, llama-bpe, qwen2): bytes/token per domain and tree memory",
                            "z2all.bench.patterns"),
        "kernels": Command("per-op fwd+bwd time and memory: reference, Triton, torch.compile, libraries",
                           "z2all.bench.kernels"),
        "model": Command("training and generation tokens/s: ours vs transformers", "z2all.bench.model"),
        "eval": Command("multiple-choice items/s: ours vs lm-eval's hf backend", "z2all.bench.evaluate"),
        "sft": Command("packed vs padded SFT batches: rows, padding share, real tokens/s", "z2all.bench.sft"),
        "finetune": Command("full vs LoRA SFT, DPO live vs precomputed reference: tokens/s, memory, checkpoint "
                            "size", "z2all.bench.finetune"),
        "llamacpp": Command("single-stream decode tokens/s: our generate vs llama.cpp on the GGUF export",
                            "z2all.bench.llamacpp"),
        "serve": Command("serving tokens/s, TTFT, inter-token latency at N streams: continuous batching vs one at a "
                         "time", "z2all.bench.serve"),
        "ablation": Command("the original llm-zero2all ablation table: naive, use_all, w/o each op, +compile",
                            "z2all.bench.ablation"),
    }),
    "plot": Command("draw loss and throughput curves of a run to PNG", "z2all.train.plot"),
    "demo": Command("the whole pipeline on the embedded demo corpus", "z2all.demo"),
}


def _load_command(cmd: Command):
    mod = importlib.import_module(cmd.module)
    return mod.Config, mod.run


def _type_name(hint) -> str:
    base, _ = strip_optional(hint)
    return getattr(base, "__name__", str(base)).upper()


class _Parser(argparse.ArgumentParser):
    """argparse with one change: an abbreviation that matches two spellings of the same option (`--out` for
    `--out_dir` and `--out-dir`) picks that option instead of failing as ambiguous."""

    def _get_option_tuples(self, option_string):  # argparse's own hook for prefix matches
        seen, out = set(), []
        for t in super()._get_option_tuples(option_string):
            if id(t[0]) not in seen:
                seen.add(id(t[0]))
                out.append(t)
        return out


def build_parser(prog: str, cmd: Command, config_cls) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=cmd.help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="TOML", help="a TOML preset; command-line options override it")
    top = {f.name for f in dataclasses.fields(config_cls)}
    for key, f, hint in leaves(config_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta.get("help", "")
        if meta.get("choices"):
            help_text += f" (one of: {', '.join(map(str, meta['choices']))})"
        base, _ = strip_optional(hint)
        # argparse %-formats help strings: a literal "5%" in our text must reach it as "5%%"
        kw = dict(dest=key, default=argparse.SUPPRESS,
                  help=f"{help_text} [default: {default}]".replace("%", "%%"))
        if meta.get("positional"):
            many = typing.get_origin(base) in (list, tuple)
            p.add_argument(key, nargs="*" if many else "?", metavar=key.upper(),
                           **{k: v for k, v in kw.items() if k != "dest"})
            continue
        names = [f"--{key}"]
        if key in top and "_" in key:
            names.append("--" + key.replace("_", "-"))
        if base is bool:
            p.add_argument(*names, nargs="?", const="true", metavar="BOOL", **kw)
        elif typing.get_origin(base) in (list, tuple):
            # repeatable, and each occurrence may itself be a comma list: --inputs a --inputs b,c
            p.add_argument(*names, action="append", metavar="ITEM[,ITEM...]", **kw)
        else:
            p.add_argument(*names, metavar=_type_name(hint), **kw)
    return p


def top_help() -> str:
    lines = ["usage: z2all <stage> [<command>] [options] [--debug]   (z2all <stage> --help for more)", "",
             "Errors print one line; --debug (or Z2ALL_DEBUG=1) shows the traceback instead.", "",
             "llm-zero2all: every piece of a Llama-2-style LLM written from scratch.", "", "stages:"]
    for name, entry in STAGES.items():
        if isinstance(entry, Command):
            lines.append(f"  {name:<11} {entry.help}")
        else:
            help_, cmds = entry
            lines.append(f"  {name:<11} {help_}")
            for cname, c in cmds.items():
                lines.append(f"      {cname:<10} {c.help}")
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, Command, list[str]]:
    """Find the command in argv; returns (prog, command, remaining args). Raises SystemExit with help."""
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from z2all import __version__

        print(f"z2all {__version__}")
        raise SystemExit(0)
    stage = argv[0]
    if stage not in STAGES:
        print(f"z2all: unknown stage '{stage}'; choose from {', '.join(STAGES)}", file=sys.stderr)
        raise SystemExit(2)
    entry = STAGES[stage]
    if isinstance(entry, Command):
        return f"z2all {stage}", entry, argv[1:]
    help_, cmds = entry
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(f"usage: z2all {stage} <command> [options]\n\n{help_}\n\ncommands:")
        for cname, c in cmds.items():
            print(f"  {cname:<10} {c.help}")
        raise SystemExit(0 if len(argv) >= 2 else 2)
    if argv[1] not in cmds:
        print(f"z2all {stage}: unknown command '{argv[1]}'; choose from {', '.join(cmds)}", file=sys.stderr)
        raise SystemExit(2)
    return f"z2all {stage} {argv[1]}", cmds[argv[1]], argv[2:]


def parse_config(prog: str, cmd: Command, args: list[str]):
    """Parse a command's arguments into its resolved Config (defaults < --config TOML < options)."""
    config_cls, _ = _load_command(cmd)
    parser = build_parser(prog, cmd, config_cls)
    ns, unknown = parser.parse_known_args(args)
    if unknown:
        parser.error(f"unknown option(s): {' '.join(unknown)} (see {prog} --help)")
    values = dict(vars(ns))
    toml = values.pop("config", None)
    for key, value in values.items():
        if isinstance(value, list):  # appended occurrences -> one flat list
            values[key] = [item for v in value for item in str(v).split(",") if item]
    return load_config(config_cls, toml, values)


def _os_error_line(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    if e.filename2:
        where += f" -> {e.filename2}"
    what = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "disk full: free space or write elsewhere; files written before are intact",
        errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
        errno.EACCES: "permission denied: choose a path you may write, or fix its permissions",
        errno.EPERM: "operation not permitted: choose a path you may write",
        errno.EROFS: "read-only file system: write elsewhere",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a file stands where a directory is needed: check the path",
        errno.EISDIR: "a directory stands where a file is needed: check the path",
        errno.EEXIST: "something already exists there: choose another path",
        errno.EMFILE: "too many open files: raise `ulimit -n` or use fewer workers",
        errno.ENOMEM: "out of memory: use smaller settings",
    }.get(e.errno, "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if e.errno == errno.ENOSPC else what
    return f"{what}:{where}" + (f" ({hint})" if hint else "")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure becomes one line on stderr and a non-zero exit: 2 for bad input
    (UserError, usage), 1 for an operating-system error or an internal error, 130 for Ctrl-C. `--debug`
    (anywhere in argv) or Z2ALL_DEBUG=1 re-raises instead, for the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("Z2ALL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    # processes the command starts (serve's engine process) show their tracebacks too; restored after, for
    # a caller that runs several commands in one process (the tests)
    env_before = os.environ.get("Z2ALL_DEBUG")
    if debug:
        os.environ["Z2ALL_DEBUG"] = "1"
    try:
        return _main(argv, debug)
    finally:
        if env_before is None:
            os.environ.pop("Z2ALL_DEBUG", None)
        else:
            os.environ["Z2ALL_DEBUG"] = env_before


def _main(argv: list[str], debug: bool) -> int:
    prog = "z2all"
    try:
        prog, cmd, rest = resolve(argv)
        cfg = parse_config(prog, cmd, rest)
        _, run = _load_command(cmd)
        result = run(cfg)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        print(f"{prog}: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: one line, the traceback behind --debug
        if debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback, "
              f"and please report it)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
