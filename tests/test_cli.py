"""The CLI command table, help output for every command, and config errors surfaced by the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from z2all import cli
from z2all.config import leaves

EXPECTED = {
    "data": ["convert", "tokenize", "chat", "prefs", "synth"],
    "tokenizer": ["train", "eval"],
    "train": None,
    "sft": None,
    "dpo": None,
    "eval": None,
    "chat": None,
    "serve": None,
    "generate": None,
    "export": ["hf", "gguf"],
    "bench": ["data", "tokenizer", "patterns", "kernels", "model", "eval", "sft", "finetune", "llamacpp", "serve",
              "ablation"],
    "plot": None,
    "demo": None,
}


def all_commands():
    for stage, entry in cli.STAGES.items():
        if isinstance(entry, cli.Command):
            yield [stage], entry
        else:
            for name, cmd in entry[1].items():
                yield [stage, name], cmd


def test_command_table_is_pinned():
    got = {s: (None if isinstance(e, cli.Command) else list(e[1])) for s, e in cli.STAGES.items()}
    assert got == EXPECTED


def test_top_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage in EXPECTED:
        assert f"  {stage} " in out


@pytest.mark.parametrize("path,cmd", list(all_commands()), ids=lambda v: "-".join(v) if isinstance(v, list) else "")
def test_every_command_has_config_run_and_help_for_every_option(path, cmd, capsys):
    config_cls, run = cli._load_command(cmd)
    assert dataclasses.is_dataclass(config_cls) and callable(run)
    for key, f, _ in leaves(config_cls):
        assert f.metadata.get("help"), f"{' '.join(path)}: option {key} has no help text"
    config_cls()  # defaults work
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "option_strings" not in out  # a bare % in a help text makes argparse print its internals
    for key, f, _ in leaves(config_cls):
        shown = key.upper() if f.metadata.get("positional") else f"--{key}"
        assert shown in out


def test_unknown_stage_and_command_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "nope"])
    assert e.value.code == 2
    assert "choose from convert, tokenize" in capsys.readouterr().err


def test_unknown_option_names_it(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "convert", "--no-such-option=3"])
    assert e.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_an_abbreviation_of_two_spellings_of_one_option_is_that_option(capsys):
    """`--out` abbreviates both `--out_dir` and `--out-dir`: one option, not an ambiguity (it was one for
    `demo --out`); an abbreviation of two different options still is."""
    from z2all.demo import Config

    p = cli.build_parser("z2all demo", cli.STAGES["demo"], Config)
    assert p.parse_args(["--out", "/tmp/x"]).out_dir == "/tmp/x"
    with pytest.raises(SystemExit):
        p.parse_args(["--s", "1"])  # --steps? --seed? ...
    assert "ambiguous option" in capsys.readouterr().err


def test_bad_value_in_toml_is_a_clear_error(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("nonexistent_key = 3\n")
    assert cli.main(["data", "convert", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'nonexistent_key'" in err and str(toml) in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "z2all", "--help"], capture_output=True, text=True, check=True)
    assert "stages:" in out.stdout and "tokenizer" in out.stdout
