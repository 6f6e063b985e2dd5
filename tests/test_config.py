"""Config precedence (defaults < TOML < CLI), type coercion, unknown keys, and saving the resolved config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from z2all import cli
from z2all.config import from_dict, load_config, opt, save_config, section
from z2all.utils import UserError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    lr: float = opt(3e-4, "learning rate")
    betas: list[float] = opt(help="adam betas", factory=lambda: [0.9, 0.95])


@dataclass
class Stage:
    out: str = opt("runs/x", "output dir")
    steps: int = opt(10, "steps")
    compile: bool = opt(False, "use torch.compile")
    limit: int | None = opt(None, "optional limit")
    kind: str = opt("a", "a choice", choices=("a", "b"))
    optim: Optim = section(Optim, "optimizer")


def test_precedence_defaults_toml_cli(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('steps = 20\nout = "runs/toml"\n[optim]\nlr = 1e-3\n')
    cfg = load_config(Stage, toml, ["steps=30", "optim.betas=0.8,0.99"])
    assert cfg.steps == 30            # CLI beats TOML
    assert cfg.out == "runs/toml"     # TOML beats default
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.betas == [0.8, 0.99]
    assert cfg.compile is False and cfg.limit is None  # defaults


def test_coercion_and_none():
    cfg = load_config(Stage, None, {"compile": "true", "limit": "1_000", "optim.lr": "2e-4"})
    assert cfg.compile is True and cfg.limit == 1000 and cfg.optim.lr == 2e-4
    assert load_config(Stage, None, {"limit": "none"}).limit is None


@pytest.mark.parametrize("override,needle", [
    ({"stepz": 1}, "unknown config key 'stepz'"),
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
    ({"steps.x": 1}, "'steps' is not a section"),
    ({"steps": "ten"}, "config key 'steps': cannot read 'ten' as int"),
    ({"compile": "maybe"}, "cannot read 'maybe' as bool"),
    ({"kind": "c"}, "'c' is not one of a, b"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(Stage, None, override)


def test_unknown_key_in_toml_names_file_and_key(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("[optim]\nmomentum = 0.9\n")
    with pytest.raises(UserError) as e:
        load_config(Stage, toml)
    assert "optim.momentum" in str(e.value) and str(toml) in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(Stage, bad)
    with pytest.raises(UserError, match="not found"):
        load_config(Stage, tmp_path / "missing.toml")
    with pytest.raises(UserError, match="is a directory"):
        load_config(Stage, tmp_path)
    bad.write_bytes(b"steps = 3\n\x95\xff\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(Stage, bad)


@pytest.mark.parametrize("name", ["tpu", "cpu:abc", "gpu"])
def test_a_device_torch_does_not_know_names_the_option(name):
    from z2all.utils import pick_device

    with pytest.raises(UserError, match=f"--device '{name}' is not a device"):
        pick_device(name)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Stage, None, {"steps": 7, "optim.lr": 0.5})
    save_config(cfg, tmp_path / "config.json", inputs=["a"])
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["inputs"] == ["a"] and "z2all_version" in data
    assert from_dict(Stage, data["config"]) == cfg


def test_cli_dashed_alias_and_dotted_override():
    cmd = cli.Command("t", __name__)  # this module has Config/run below
    cfg = cli.parse_config("t", cmd, ["--limit", "5", "--optim.lr=0.1", "--compile"])
    assert cfg.limit == 5 and cfg.optim.lr == 0.1 and cfg.compile is True


def test_every_preset_loads():
    """Every TOML preset under configs/ loads into its command's Config. Presets are for `z2all train`
    unless their first line says otherwise, as `# z2all <stage> [<command>] ...`."""
    presets = sorted((REPO / "configs").glob("*.toml"))
    assert presets, "no presets under configs/"
    for path in presets:
        first = (path.read_text().splitlines() or [""])[0]
        words = first[2:].split()[1:3] if first.startswith("# z2all ") else ["train"]
        if words and words[0] in cli.STAGES and isinstance(cli.STAGES[words[0]], cli.Command):
            words = words[:1]
        _, cmd, _ = cli.resolve(words)
        config_cls, _ = cli._load_command(cmd)
        load_config(config_cls, path)


Config = Stage


def run(cfg):  # pragma: no cover - only parsed, never run
    return 0
