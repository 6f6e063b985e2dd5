"""`z2all bench kernels` on CPU at a tiny shape: every op gets a measured eager row, the Triton rows (both
attention backwards) say they need a GPU, Liger says whether it is installed, attention gets its SDPA row with
a TFLOP/s figure; every row is printed as it is measured, and --out ends as the same table, aligned."""

from __future__ import annotations

import importlib.util

from z2all.bench.kernels import OPS, Config, run


def _rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def test_bench_kernels_cpu_table(tmp_path, capsys):
    out = tmp_path / "kernels.md"
    cfg = Config(size="cpu", batch=1, seq=32, dim=64, n_heads=2, n_kv_heads=1, ffn_dim=96, vocab=300,
                 device="cpu", warmup=0, iters=1, compile=False, out=str(out))
    assert run(cfg) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    rows = _rows(text)
    assert rows == _rows(printed)  # the progressive rows printed are the rows of the final file
    assert {r[0].split()[0] for r in rows} == {"rmsnorm", "rope", "swiglu", "linear+CE", "attention"}
    assert len(OPS) == 5
    liger = "not installed" if importlib.util.find_spec("liger_kernel") is None else "needs a GPU"
    for r in rows:
        if r[1] == "eager":
            assert float(r[2]) > 0
        if r[1].startswith("triton"):
            assert r[2] == "-" and "needs a GPU" in r[8]
        if r[1] == "liger":
            assert liger in r[8]
    assert {r[1] for r in rows if r[0].startswith("attention")} == {"eager", "triton", "triton-atomic", "sdpa"}
    sdpa = [r for r in rows if r[1] == "sdpa"]
    assert len(sdpa) == 1 and float(sdpa[0][7]) > 0
    assert "need a GPU" in text.splitlines()[-1]


def test_bench_kernels_rows_survive_a_cut(tmp_path, monkeypatch):
    """A run killed mid-table (the GPU check's per-stage timeout) leaves every finished row in --out."""
    import pytest

    from z2all.bench import kernels

    out = tmp_path / "kernels.md"
    real = kernels.measure
    calls = []

    def measure_then_die(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a SIGTERM/SIGKILL would leave: no finish()
        return real(*a, **k)

    monkeypatch.setattr(kernels, "measure", measure_then_die)
    cfg = Config(size="cpu", batch=1, seq=16, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=48, vocab=64, device="cpu",
                 warmup=0, iters=1, compile=False, out=str(out), ops="rmsnorm,rope,swiglu")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    rows = _rows(out.read_text())
    assert [r[:2] for r in rows if r[1] == "eager"] == [["rmsnorm [16, 32]", "eager"],
                                                       ["rope q[1,2,16,16] k[1,1,16,16]", "eager"]]
