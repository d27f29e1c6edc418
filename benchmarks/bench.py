"""Both backends side by side: training step, sampling, eval throughput, peak memory, utilisation.

    python -m benchmarks.bench                                  # small and medium, fp32 and bf16
    python -m benchmarks.bench --sizes=small --dtypes=float32 --steps=10 --out=docs/benchmarks
    python -m benchmarks.bench --sizes=small --dtypes=float32 --official=../vdm --port=../variational-diffusion-models

Each (backend, size, dtype) runs in its own subprocess, one after the other, so peak memory and thread
pools do not mix. A worker times N training steps after warm-up (median and spread, device
synchronised), sampling steps, and eval batches, and a large GEMM in the same framework on the same
device. Utilisation = analytic FLOPs of a training step (vdm_common/architecture.py) per second of median step
time, over the device's matmul ceiling: the faster of the two frameworks' GEMMs of that dtype in the run
(and, in brackets, over the framework's own GEMM). Writes bench.json and bench.md under --out.

--repeats=N measures every (backend, size, dtype) N times, round-robin (all of them once, then again), and
reports for each the repeat with the median training step (the others' medians listed beside it): the
load of a shared machine drifts over minutes, and round-robin spreads it over all backends alike.

--official / --port name local checkouts of the upstream implementations (google-research/vdm and
addtt/variational-diffusion-models): their code is then timed beside ours in the same run, on the small
float32 config only (the one their earlier figures are for), by benchmarks/upstream_workers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


from vdm_common.config import ModelConfig, make_config
from vdm_common.architecture import sample_step_flops, train_step_flops

# The small config is the one the upstream implementations were timed on (16x16x3, batch 16, 64 channels,
# 8 blocks, Fourier features, mid attention only, dropout 0.1, learned scalar schedule, one AdamW step).
SIZES = {
    "small": dict(image=(16, 16, 3), batch=16, model=dict(sm_n_embd=64, sm_n_layer=8)),
    "medium": dict(image=(32, 32, 3), batch=32, model=dict(sm_n_embd=128, sm_n_layer=8)),
    "cifar10": dict(image=(32, 32, 3), batch=128, model=dict(sm_n_embd=128, sm_n_layer=32)),
}
# The training call whose compile time is measured has the quickstart's 10 substeps (the official configs
# have 10 to 1000); a rolled scan compiles one step whatever their number.
STARTUP_SUBSTEPS = 10
BASE_MODEL = dict(vocab_size=256, image_channels=3, gamma_type="learnable_scalar", sm_pdrop=0.1,
                  with_fourier_features=True, with_attention=False)


def model_for(size: str, dtype: str) -> ModelConfig:
    return ModelConfig(**{**BASE_MODEL, **SIZES[size]["model"], "compute_dtype": dtype})


def summarise(seconds: list[float]) -> dict:
    return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds), n=len(seconds))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024                 # Linux: KiB


# ------------------------------------------------------ shared by our workers and benchmarks/upstream_workers.py
def jax_timed(fn, n: int):
    """Calls fn n times, each to completion (block_until_ready); returns (last output, seconds of each)."""
    import jax

    out, times = None, []
    for _ in range(n):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, times


def jax_device_figures(dtype: str) -> dict:
    """The device, the peak memory of the work done so far (before the GEMM), and the GEMM rate of this dtype
    in JAX."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    peak = device.memory_stats().get("peak_bytes_in_use") if device.platform != "cpu" else None
    memory = dict(peak_memory_bytes=peak or peak_rss_bytes(), memory_kind="device peak" if peak else "host RSS")
    n = 2048 if device.platform == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(3), (n, n)).astype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax_timed(lambda: matmul(a), 2)
    _, mm_times = jax_timed(lambda: matmul(a), 5)
    return dict(device=f"{device.platform}: {device.device_kind}",
                matmul_flops_per_s=2 * n ** 3 / statistics.median(mm_times), **memory)


def torch_timed(fn, n: int, device: str) -> list[float]:
    """Calls fn n times, the device synchronised around each; returns the seconds of each."""
    import torch

    times = []
    for _ in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def torch_device_figures(dtype: str, device: str) -> dict:
    """The device, the peak memory of the work done so far (before the GEMM), and the GEMM rate of this dtype
    in torch."""
    import torch

    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    memory = dict(peak_memory_bytes=peak or peak_rss_bytes(), memory_kind="device peak" if peak else "host RSS")
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    torch_timed(lambda: a @ a, 2, device)
    mm_times = torch_timed(lambda: a @ a, 5, device)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return dict(device=f"{device}: {name}", matmul_flops_per_s=2 * n ** 3 / statistics.median(mm_times), **memory)


# ---------------------------------------------------------------------------------------------- JAX worker
def jax_compile_seconds(mc: ModelConfig, opt, batch: int, image, substeps: int = STARTUP_SUBSTEPS) -> dict:
    """Cold trace + lower + compile seconds of what the trainer compiles before its first step: the engine's
    training call (`substeps` steps of batch images), its eval function and one sampler step. The
    persistent compilation cache is off, so each is compiled here."""
    import jax
    import jax.numpy as jnp

    from vdm_common.noise import eval_noise
    from vdm_jax import engine, steps as jsteps

    jax.config.update("jax_enable_compilation_cache", False)
    mesh = engine.make_mesh(jax.devices()[:1])
    state = jsteps.create_train_state(mc, opt, jax.random.PRNGKey(0), image)
    x, c = jnp.zeros((substeps, batch, *image), jnp.int32), jnp.zeros((substeps, batch))
    dtype = jnp.float32 if mc.compute_dtype != "float64" else jnp.float64
    noise = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype),
                                   eval_noise(0, range(batch), 0, image, mc.sm_n_timesteps))
    z = jnp.zeros((batch, *image), dtype)
    step, _ = engine.make_sample_fns(mc, 1000)
    calls = dict(train=lambda: engine.make_train_fn(mc, opt, mesh).lower(state, x, c, jax.random.key(0)),
                 eval=lambda: engine.make_eval_fn(mc, mesh).lower(state.params, x[0], c[0], noise),
                 sample=lambda: step.lower(state.params, z, 0, c[0], z))
    seconds = {}
    for name, lower in calls.items():
        start = time.perf_counter()
        lower().compile()
        seconds[name] = time.perf_counter() - start
    return seconds


def jax_worker(size: str, dtype: str, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    from vdm_jax import steps as jsteps
    from vdm_jax import vdm

    mc, spec = model_for(size, dtype), SIZES[size]
    opt = make_config(BASE_MODEL).optimizer
    batch, image = spec["batch"], spec["image"]
    rng = jax.random.PRNGKey(0)
    state = jsteps.create_train_state(mc, opt, rng, image)
    x = jax.random.randint(jax.random.PRNGKey(1), (batch, *image), 0, 256)
    c = jnp.zeros((batch,))
    step = jax.jit(lambda s, x, c: jsteps.train_step(mc, opt, s, x, c, rng), donate_argnums=0)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], x, c)
        return metrics["bpd"]

    jax_timed(one_step, warmup)
    _, train_times = jax_timed(one_step, steps)

    params = holder["state"].params
    z = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    sample_step = jax.jit(lambda p, z, i: vdm.VDM(mc).apply({"params": p}, z, i, 1000, c, z,
                                                            method=vdm.VDM.sample_step))
    jax_timed(lambda: sample_step(params, z, 0), warmup)
    _, sample_times = jax_timed(lambda: sample_step(params, z, 1), steps)
    eval_fn = jax.jit(lambda p, x: jsteps.eval_terms(mc, p, x, c, vdm.draw_noise(rng, x.shape, mc))["bpd"])
    jax_timed(lambda: eval_fn(params, x), warmup)
    _, eval_times = jax_timed(lambda: eval_fn(params, x), steps)
    figures = jax_device_figures(dtype)           # peak memory of the measured work, before the compiles below
    return dict(train=summarise(train_times), sample=summarise(sample_times), eval=summarise(eval_times),
                compile_s=jax_compile_seconds(mc, opt, batch, image), version=jax.__version__, **figures)


# -------------------------------------------------------------------------------------------- torch worker
def torch_setup(size: str, dtype: str):
    """(device, model config, optimizer config, fresh training state, generator, images (B, C, H, W),
    conditioning (B,)) of a torch measurement, on the GPU where there is one."""
    import torch

    from vdm_torch import steps as tsteps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mc, spec = model_for(size, dtype), SIZES[size]
    opt = make_config(BASE_MODEL).optimizer
    batch, (H, W, C) = spec["batch"], spec["image"]
    state = tsteps.create_train_state(mc, opt, 0, device=device, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, C, H, W), generator=generator, device=device)
    return device, mc, opt, state, generator, x, torch.zeros(batch, device=device)


def torch_worker(size: str, dtype: str, steps: int, warmup: int) -> dict:
    import torch

    from vdm_torch import steps as tsteps
    from vdm_torch import vdm as tvdm

    device, mc, opt, state, generator, x, c = torch_setup(size, dtype)

    def one_step():
        tsteps.train_step(mc, opt, state, x, c, generator=generator)

    torch_timed(one_step, warmup, device)
    train_times = torch_timed(one_step, steps, device)
    z = torch.randn(x.shape, generator=generator, device=device)
    with torch.no_grad():
        torch_timed(lambda: state.model.sample_step(z, 0, 1000, c, z), warmup, device)
        sample_times = torch_timed(lambda: state.model.sample_step(z, 1, 1000, c, z), steps, device)
    def evaluate():
        return tsteps.eval_terms(state.ema, x, c, tvdm.draw_noise(generator, x.shape, mc, device))["bpd"]

    torch_timed(evaluate, warmup, device)
    eval_times = torch_timed(evaluate, steps, device)
    return dict(train=summarise(train_times), sample=summarise(sample_times), eval=summarise(eval_times),
                version=torch.__version__, **torch_device_figures(dtype, device))


WORKERS = {"jax": jax_worker, "torch": torch_worker}
# The upstream workers (benchmarks/upstream_workers.py): each against our backend of the same framework.
UPSTREAM = {"official": "jax", "port": "torch"}
UPSTREAM_RUN = ("small", "float32")     # the (size, dtype) the upstream code is timed on: their figures' config


def run_worker(backend: str, size: str, dtype: str, steps: int, warmup: int, threads: int | None,
               checkout: str | None = None, timeout: float | None = None) -> dict:
    """Runs one measurement in a fresh interpreter; returns its result with derived figures added.
    checkout: for an upstream backend, the local checkout of its code. timeout: seconds after which the
    worker is stopped and the measurement recorded as failed (the run goes on with the next one)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), XLA_FLAGS=env.get("XLA_FLAGS", ""))
    module = "benchmarks.upstream_workers" if backend in UPSTREAM else "benchmarks.bench"
    cmd = [sys.executable, "-m", module, "--worker", backend, "--sizes", size, "--dtypes", dtype,
           "--steps", str(steps), "--warmup", str(warmup)] + (["--checkout", checkout] if checkout else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(backend=backend, size=size, dtype=dtype, error=[f"stopped after --worker_timeout={timeout:g} s"])
    if proc.returncode != 0:
        return dict(backend=backend, size=size, dtype=dtype, error=proc.stderr.strip().splitlines()[-1:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # FLOPs from our analytic count for the same config, upstream included: the work is the same function.
    spec, mc = SIZES[size], model_for(size, dtype)
    flops = train_step_flops(mc, spec["image"], spec["batch"])
    step_s = result["train"]["median"]
    result.update(backend=backend, size=size, dtype=dtype, batch=spec["batch"], image=spec["image"],
                  train_step_flops=flops, images_per_s=spec["batch"] / step_s,
                  achieved_flops_per_s=flops / step_s,
                  sample_flops_per_s=sample_step_flops(mc, spec["image"], spec["batch"]) / result["sample"]["median"],
                  sample_s_per_step=result["sample"]["median"],
                  sample_s_per_image_1000_steps=1000 * result["sample"]["median"] / spec["batch"],
                  eval_images_per_s=spec["batch"] / result["eval"]["median"])
    return result


def add_utilisation(results: list[dict]) -> None:
    """utilisation = achieved FLOP/s over the device's matmul ceiling: the fastest GEMM of that dtype either
    framework ran in this run (the frameworks' GEMMs differ, e.g. 2x on a CPU; a ceiling one framework
    reaches is one the device has). utilisation_own_gemm: over the same framework's GEMM."""
    ok = [r for r in results if "error" not in r]
    for r in ok:
        ceiling = max(o["matmul_flops_per_s"] for o in ok if o["dtype"] == r["dtype"])
        r.update(matmul_ceiling_flops_per_s=ceiling, utilisation=r["achieved_flops_per_s"] / ceiling,
                 utilisation_own_gemm=r["achieved_flops_per_s"] / r["matmul_flops_per_s"],
                 sample_utilisation=r["sample_flops_per_s"] / ceiling)


def compile_cell(result: dict) -> str:
    """'train, eval, sample' cold compile seconds (JAX); '-' for eager torch (it compiles nothing)."""
    seconds = result.get("compile_s")
    return ", ".join(f"{seconds[k]:.1f}" for k in ("train", "eval", "sample")) if seconds else "-"


def markdown(results: list[dict]) -> str:
    lines = ["| size | dtype | backend | train step s (median [min, max]) | img/s | sample s/step | "
             "eval img/s | peak memory | GFLOP/step | utilisation (own GEMM) | cold compile s: train, eval, sample "
             "| device |", "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r['backend']} | failed: {r['error']} |" + " |" * 8)
            continue
        t = r["train"]
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['backend']} | {t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}] "
            f"| {r['images_per_s']:.1f} | {r['sample_s_per_step']:.4f} | {r['eval_images_per_s']:.1f} "
            f"| {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['memory_kind']}) | {r['train_step_flops'] / 1e9:.2f} "
            f"| {100 * r['utilisation']:.1f}% ({100 * r['utilisation_own_gemm']:.1f}%) | {compile_cell(r)} "
            f"| {r['device']} |")
    repeated = [f"- {r['size']} {r['dtype']} {r['backend']}: median step of each repeat "
                + ", ".join("failed" if t is None else f"{t:.3f}" for t in r["repeat_step_medians"]) + " s"
                for r in results if "repeat_step_medians" in r]
    return "\n".join(lines + [""] + ratio_lines(results) + repeated) + "\n"


def ratio_lines(results: list[dict]) -> list[str]:
    """Median step time ratios: torch over JAX, and each of our backends over the upstream code of its
    framework (below 1: ours is faster), plus a note on what the upstream rows cover."""
    ok = [r for r in results if "error" not in r]

    def find(backend: str, like: dict) -> dict | None:
        return next((o for o in ok if o["backend"] == backend and o["size"] == like["size"]
                     and o["dtype"] == like["dtype"]), None)

    lines = []
    for r in ok:
        jax_result = find("jax", r)
        if r["backend"] == "torch" and jax_result:
            lines.append(f"- {r['size']} {r['dtype']}: torch/JAX step time = "
                         f"{r['train']['median'] / jax_result['train']['median']:.2f}")
    for r in ok:
        ours = find(UPSTREAM[r["backend"]], r) if r["backend"] in UPSTREAM else None
        if ours:
            lines.append(f"- {r['size']} {r['dtype']}: {ours['backend']} / {r['backend']} step time = "
                         f"{ours['train']['median'] / r['train']['median']:.2f} "
                         f"({r['backend']} {r['train']['median']:.2f} s)")
    if any(r["backend"] in UPSTREAM for r in results):
        lines.append(f"- official (google-research/vdm) and port (addtt/variational-diffusion-models): their code "
                     f"from local checkouts, timed on {' '.join(UPSTREAM_RUN)} only (other sizes and dtypes not "
                     f"run); their utilisation uses our analytic FLOPs of the same config")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--backends", default="jax,torch", help="comma list of ours; may be empty")
    parser.add_argument("--official", metavar="PATH", help="checkout of google-research/vdm to time beside ours")
    parser.add_argument("--port", metavar="PATH", help="checkout of addtt/variational-diffusion-models")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the workers")
    parser.add_argument("--repeats", type=int, default=1, help="measure each N times, round-robin")
    parser.add_argument("--worker_timeout", type=float, default=None,
                        help="seconds after which one measurement is stopped and recorded as failed")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: give 1 or more")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.sizes, args.dtypes, args.steps, args.warmup)))
        return
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    upstream = {name: os.path.abspath(path) for name, path in (("official", args.official), ("port", args.port))
                if path}
    if upstream and not (UPSTREAM_RUN[0] in sizes and UPSTREAM_RUN[1] in dtypes):
        print(f"note: the upstream code is timed on {' '.join(UPSTREAM_RUN)} only, which this run leaves out",
              flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.platform(), cpus=os.cpu_count(),
                python=platform.python_version(),
                upstream_checkouts={name: os.path.basename(path) for name, path in upstream.items()})
    measurements = [(size, dtype, backend, checkout) for size in sizes for dtype in dtypes
                    for backend, checkout in [(b, None) for b in args.backends.split(",") if b]
                    + (list(upstream.items()) if (size, dtype) == UPSTREAM_RUN else [])]
    repeats: list[list[dict]] = [[] for _ in measurements]
    table = ""
    for repeat in range(args.repeats):
        for runs, (size, dtype, backend, checkout) in zip(repeats, measurements):
            runs.append(run_worker(backend, size, dtype, args.steps, args.warmup, args.threads, checkout,
                                   args.worker_timeout))
            r = runs[-1]
            print(f"{size} {dtype} {backend}" + (f" (repeat {repeat + 1})" if args.repeats > 1 else "") + ": "
                  + (f"{r['train']['median']:.3f} s/step on {r['device']}" if "error" not in r
                     else f"failed {r['error']}"), flush=True)
            # After each: a stopped run keeps what it measured.
            table = write_results(args.out, meta, [median_run(runs) for runs in repeats if runs])
    print(table)


def median_run(runs: list[dict]) -> dict:
    """Of one measurement's repeats, the one with the median training step (the lower middle of an even
    count; failed repeats left out, the last failure if all failed), with every repeat's step time added."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["train"]["median"])
    if not ok:
        return runs[-1]
    chosen = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["repeat_step_medians"] = [r["train"]["median"] if "error" not in r else None for r in runs]
    return chosen


def write_results(out: str, meta: dict, results: list[dict]) -> str:
    """Writes bench.json and bench.md under `out` (utilisation over this run's ceilings); returns the table."""
    add_utilisation(results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as fh:
        json.dump(dict(meta=meta, results=results), fh, indent=1)
    table = markdown(results)
    with open(os.path.join(out, "bench.md"), "w") as fh:
        fh.write(f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs).\n\n{table}")
    return table


if __name__ == "__main__":
    main()
