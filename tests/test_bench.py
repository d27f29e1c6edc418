"""The benchmark's report (benchmarks/bench.py) and its upstream workers (benchmarks/upstream_workers.py).

The report is a pure function of the results, checked on fabricated ones. The upstream workers need
checkouts of the upstream code, which this repository does not hold: set VDM_OFFICIAL_PATH to one of
google-research/vdm (the folder holding vdm/model_vdm.py) and VDM_PORT_PATH to one of
addtt/variational-diffusion-models to run them for one step each.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import bench, torch_options

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fabricated(backend: str, step_s: float, size: str = "small", dtype: str = "float32", gemm: float = 1e11):
    """A worker result as run_worker returns it, before add_utilisation."""
    flops = 2e9
    return dict(backend=backend, size=size, dtype=dtype, train=dict(median=step_s, min=step_s, max=step_s, n=1),
                images_per_s=16 / step_s, sample_s_per_step=0.01, eval_images_per_s=100.0,
                peak_memory_bytes=2**30, memory_kind="host RSS", train_step_flops=flops,
                achieved_flops_per_s=flops / step_s, sample_flops_per_s=1e10, matmul_flops_per_s=gemm,
                device="cpu: test")


def test_ratio_lines_compare_ours_with_each_upstream_backend():
    results = [fabricated("jax", 0.45), fabricated("torch", 0.2), fabricated("official", 0.9),
               fabricated("port", 0.5), fabricated("jax", 1.0, size="medium"),
               fabricated("torch", 3.0, size="medium"),
               dict(backend="torch", size="small", dtype="bfloat16", error=["RuntimeError: boom"])]
    bench.add_utilisation(results)
    lines = bench.ratio_lines(results)
    assert lines[:4] == ["- small float32: torch/JAX step time = 0.44",
                         "- medium float32: torch/JAX step time = 3.00",
                         "- small float32: jax / official step time = 0.50 (official 0.90 s)",
                         "- small float32: torch / port step time = 0.40 (port 0.50 s)"]
    assert len(lines) == 5 and "small float32 only" in lines[4]
    text = bench.markdown(results)
    assert "| small | float32 | port | 0.500 [0.500, 0.500] |" in text
    assert "| small | bfloat16 | torch | failed: ['RuntimeError: boom'] |" in text
    assert text.endswith("\n".join(lines) + "\n")


def test_ratio_lines_skip_failed_counterparts_and_note_upstream_only_when_run():
    ours_only = [fabricated("jax", 0.5), fabricated("torch", 0.25)]
    bench.add_utilisation(ours_only)
    assert bench.ratio_lines(ours_only) == ["- small float32: torch/JAX step time = 0.50"]
    failed_jax = [dict(backend="jax", size="small", dtype="float32", error=["x"]), fabricated("official", 0.9)]
    bench.add_utilisation(failed_jax)
    lines = bench.ratio_lines(failed_jax)
    assert len(lines) == 1 and lines[0].startswith("- official (google-research/vdm)")


def test_utilisation_of_upstream_rows_uses_the_fastest_gemm_of_the_run():
    results = [fabricated("torch", 0.2, gemm=2e11), fabricated("port", 0.5, gemm=1e11)]
    bench.add_utilisation(results)
    port = results[1]
    assert port["utilisation"] == pytest.approx(2e9 / 0.5 / 2e11)
    assert port["utilisation_own_gemm"] == pytest.approx(2e9 / 0.5 / 1e11)


@pytest.mark.slow
@pytest.mark.parametrize("backend, variable", [("official", "VDM_OFFICIAL_PATH"), ("port", "VDM_PORT_PATH")])
def test_upstream_worker_times_a_step(backend, variable, tmp_path):
    checkout = os.environ.get(variable)
    if not checkout:
        pytest.skip(f"set {variable} to a checkout of the upstream code")
    cmd = [sys.executable, "-m", "benchmarks.bench", "--backends=", f"--{backend}={checkout}", "--steps=1",
           "--warmup=1", "--sizes=small", "--dtypes=float32", f"--out={tmp_path}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["backend"] for r in results] == [backend]
    assert "error" not in results[0], results[0].get("error")
    assert results[0]["train"]["median"] > 0 and results[0]["sample"]["median"] > 0
    assert results[0]["checkout"] == os.path.basename(os.path.normpath(checkout))


def test_a_worker_past_its_timeout_is_recorded_as_failed_and_the_run_goes_on(tmp_path, capsys):
    # The workers cannot import torch or JAX within 10 ms: both are stopped, each result is written as it comes.
    bench.main(["--sizes=small", "--dtypes=float32", "--steps=1", "--warmup=1", "--worker_timeout=0.01",
                f"--out={tmp_path}"])
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["backend"], r["error"]) for r in results] == [
        ("jax", ["stopped after --worker_timeout=0.01 s"]), ("torch", ["stopped after --worker_timeout=0.01 s"])]
    assert "| small | float32 | torch | failed: ['stopped after --worker_timeout=0.01 s'] |" in \
        (tmp_path / "bench.md").read_text()
    assert "small float32 jax: failed" in capsys.readouterr().out


def test_repeats_report_the_median_run_and_list_every_repeat():
    failed = dict(backend="jax", size="small", dtype="float32", error=["x"])
    runs = [fabricated("jax", 0.40), failed, fabricated("jax", 0.30), fabricated("jax", 0.35)]
    chosen = bench.median_run(runs)
    assert chosen["train"]["median"] == 0.35 and chosen["repeat_step_medians"] == [0.40, None, 0.30, 0.35]
    bench.add_utilisation([chosen])
    assert "- small float32 jax: median step of each repeat 0.400, failed, 0.300, 0.350 s" in bench.markdown([chosen])
    assert bench.median_run([fabricated("jax", 0.4), fabricated("jax", 0.2)])["train"]["median"] == 0.2
    assert "repeat_step_medians" not in bench.median_run([fabricated("jax", 0.4)])
    last = dict(failed, error=["y"])
    assert bench.median_run([failed, last]) is last
    with pytest.raises(SystemExit):
        bench.main(["--repeats=0"])


def test_torch_options_time_each_option_beside_the_default(tmp_path):
    out = tmp_path / "options.json"
    torch_options.main(["--options=channels_last,channels_last+cudnn_benchmark", "--steps=1", "--warmup=1",
                        f"--out={out}"])
    rows = json.loads(out.read_text())
    assert [(r["option"], r["size"], r["dtype"]) for r in rows] == [
        ("default", "small", "float32"), ("channels_last", "small", "float32"),
        ("channels_last+cudnn_benchmark", "small", "float32")]
    assert rows[0]["device"] == rows[1]["device"] == rows[2]["device"]
    assert all(r["first_step_s"] > 0 and r["peak_memory_bytes"] is None for r in rows)     # CPU: no device memory
    assert rows[0]["ratio_to_default"] == 1.0
    assert rows[1]["ratio_to_default"] == pytest.approx(rows[1]["train"]["median"] / rows[0]["train"]["median"])
    for bad in ("--options=fast", "--options=compile+fast", "--sizes=huge"):
        with pytest.raises(SystemExit):
            torch_options.main([bad])
