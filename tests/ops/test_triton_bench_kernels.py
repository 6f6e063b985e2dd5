"""`z2all bench kernels` on CPU at a tiny shape: every op gets a measured eager row, the Triton rows say they
need a GPU, attention gets its SDPA row with a TFLOP/s figure, and --out writes the same table."""

from __future__ import annotations

from z2all.bench.kernels import OPS, Config, run


def test_bench_kernels_cpu_table(tmp_path, capsys):
    out = tmp_path / "kernels.md"
    cfg = Config(size="cpu", batch=1, seq=32, dim=64, n_heads=2, n_kv_heads=1, ffn_dim=96, vocab=300,
                 device="cpu", warmup=0, iters=1, compile=False, out=str(out))
    assert run(cfg) == 0
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert {r[0].split()[0] for r in rows} == {"rmsnorm", "rope", "swiglu", "linear+CE", "attention"}
    assert len(OPS) == 5
    for r in rows:
        if r[1] == "eager":
            assert float(r[2]) > 0 and r[3] == "1.00x"
        if r[1] == "triton":
            assert r[2] == "-" and "needs a GPU" in r[8]
    sdpa = [r for r in rows if r[1] == "sdpa"]
    assert len(sdpa) == 1 and float(sdpa[0][7]) > 0
    assert "need a GPU" in text.splitlines()[-1]
