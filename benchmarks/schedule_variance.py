"""How much the noise schedule changes the variance of the diffusion-loss estimate (paper Appendix I.2).

Trains the same model on the same batches with three schedules,
  fixed             gamma linear in t between the config's gamma_min and gamma_max
  learnable_scalar  gamma = b + |w| t, both learned on the VLB
  variance_min      learned endpoints around a monotone network whose shape minimises the variance
and every `--every` steps measures, on a fixed set of test images, the variance of the one-sample
diffusion-loss estimate (t ~ U[0, 1), fresh eps; bits/dim^2, averaged over images). At the end it reports
the test-set bpd (continuous-time bound) of the EMA parameters, and writes JSON, a markdown table and a
PNG of the variance curves.

    python -m benchmarks.schedule_variance --backend=jax --steps=1000 --out=docs/schedule_variance
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from vdm_common import data as vdm_data
from vdm_common.config import load_config, model_config

SCHEDULES = {
    "fixed": dict(gamma_type="fixed"),
    "learnable_scalar": dict(gamma_type="learnable_scalar"),
    "variance_min": dict(gamma_type="learnable_nnet_endpoints", variance_minimisation=True),
}


def eval_summary(values: np.ndarray) -> dict:
    return dict(bpd=float(values.mean()), stderr=float(values.std(ddof=1) / np.sqrt(len(values))), n=len(values))


def jax_runner(model_cfg, config, dataset, seed):
    """Closures (train(n_steps), diffusion_draws(images, draws, key), test_bpd()) over one JAX run."""
    import jax
    import jax.numpy as jnp

    from vdm_jax import steps, vdm

    state = steps.create_train_state(model_cfg, config.optimizer, jax.random.PRNGKey(seed), dataset.image_shape)
    rng = jax.random.PRNGKey(seed + 1)
    substeps = 10
    run = jax.jit(lambda s, x, c: steps.train_substeps(model_cfg, config.optimizer, s, x, c, rng), donate_argnums=0)
    plain = dataclasses.replace(model_cfg, antithetic_time_sampling=False)

    def train(first_step, n_steps):
        nonlocal state
        for start in range(first_step, first_step + n_steps, substeps):
            batches = [vdm_data.train_batch(dataset, seed, s, config.training.batch_size_train)
                       for s in range(start, start + substeps)]
            state, _ = run(state, np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches]))

    @jax.jit
    def draws_fn(params, images, key):
        terms = vdm.VDM(plain).apply({"params": params}, images, jnp.zeros(images.shape[0]),
                                     vdm.draw_noise(key, images.shape, plain))
        return terms.diff * vdm.nats_to_bpd_scale(images.shape[1:])

    def diffusion_draws(images, n_draws, key_seed):
        reps = np.repeat(images, n_draws, axis=0)                                    # (B R, H, W, C)
        out = draws_fn(state.params, reps, jax.random.PRNGKey(key_seed))
        return np.asarray(out).reshape(len(images), n_draws)

    eval_fn = jax.jit(lambda p, x, key: steps.eval_terms(model_cfg, p, x, jnp.zeros(x.shape[0]),
                                                         vdm.draw_noise(key, x.shape, model_cfg))["bpd"])

    def test_bpd():
        values = []
        for i, (x, _, mask) in enumerate(vdm_data.eval_batches(dataset, config.training.batch_size_eval)):
            per_example = np.asarray(eval_fn(state.ema_params, x, jax.random.PRNGKey(10_000 + i)))
            values.append(per_example[mask > 0])
        return eval_summary(np.concatenate(values))

    return train, diffusion_draws, test_bpd


def torch_runner(model_cfg, config, dataset, seed):
    """The same closures over one PyTorch run (NCHW)."""
    import torch

    from vdm_torch import steps, vdm

    state = steps.create_train_state(model_cfg, config.optimizer, seed)
    plain = dataclasses.replace(model_cfg, antithetic_time_sampling=False)

    def to_torch(images):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.int64))

    def train(first_step, n_steps):
        for step in range(first_step, first_step + n_steps):
            x, c = vdm_data.train_batch(dataset, seed, step, config.training.batch_size_train)
            steps.train_step(model_cfg, config.optimizer, state, to_torch(x), torch.from_numpy(c),
                             generator=steps.step_generator(seed, step))

    @torch.no_grad()
    def diffusion_draws(images, n_draws, key_seed):
        reps = to_torch(np.repeat(images, n_draws, axis=0))
        noise = vdm.draw_noise(steps.step_generator(key_seed, 0), reps.shape, plain)
        terms = state.model.loss_terms(reps, torch.zeros(reps.shape[0]), noise)
        return (terms.diff * vdm.nats_to_bpd_scale(reps.shape[1:])).numpy().reshape(len(images), n_draws)

    def test_bpd():
        values = []
        for i, (x, _, mask) in enumerate(vdm_data.eval_batches(dataset, config.training.batch_size_eval)):
            images = to_torch(x)
            noise = vdm.draw_noise(steps.step_generator(10_000 + i, 0), images.shape, model_cfg)
            per_example = steps.eval_terms(state.ema, images, torch.zeros(len(x)), noise)["bpd"].numpy()
            values.append(per_example[mask > 0])
        return eval_summary(np.concatenate(values))

    return train, diffusion_draws, test_bpd


def measure(backend: str, steps_total: int, every: int, n_images: int, n_draws: int, config_path: str, seed: int):
    """Runs the three schedules; returns {schedule: {'steps', 'variance', 'mean', 'test', 'seconds'}}."""
    config = load_config(config_path)
    dataset = vdm_data.load_dataset(config.data)
    probe = dataset.test[:n_images]
    runner = jax_runner if backend == "jax" else torch_runner
    results = {}
    for name, overrides in SCHEDULES.items():
        model_cfg = dataclasses.replace(model_config(config), **overrides)
        train, diffusion_draws, test_bpd = runner(model_cfg, config, dataset, seed)
        curve = dict(steps=[], variance=[], mean=[])
        start = time.time()
        for step in range(0, steps_total + 1, every):
            if step:
                train(step - every, every)
            draws = diffusion_draws(probe, n_draws, key_seed=seed + 7)
            curve["steps"].append(step)
            curve["variance"].append(float(draws.var(axis=1, ddof=1).mean()))
            curve["mean"].append(float(draws.mean()))
            print(f"[{backend}] {name:16s} step {step:5d}  var {curve['variance'][-1]:.4f} bpd^2  "
                  f"diffusion bpd {curve['mean'][-1]:.4f}", flush=True)
        curve["test"] = test_bpd()
        curve["seconds"] = time.time() - start
        results[name] = curve
    return results


def write_report(results: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "schedule_variance.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    lines = ["| backend | schedule | variance at end (bpd^2) | mean over training (bpd^2) | ratio to fixed (end) "
             "| test bpd (continuous bound, EMA) |", "|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (backend, runs) in zip(axes[0], results.items()):
        fixed_end = runs["fixed"]["variance"][-1]
        for name, curve in runs.items():
            ax.plot(curve["steps"], curve["variance"], label=name)
            test = curve["test"]
            lines.append(f"| {backend} | {name} | {curve['variance'][-1]:.4f} | {np.mean(curve['variance'][1:]):.4f} "
                         f"| {curve['variance'][-1] / fixed_end:.3f} | {test['bpd']:.4f} +- {test['stderr']:.4f} |")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("variance of the diffusion-loss estimate (bits/dim^2)")
        ax.set_title(f"{backend}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "schedule_variance.png"), dpi=100)
    with open(os.path.join(out_dir, "schedule_variance.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch", "both"), default="both")
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="steps between variance measurements")
    parser.add_argument("--images", type=int, default=64, help="test images the variance is measured on")
    parser.add_argument("--draws", type=int, default=32, help="noise draws per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/schedule_variance")
    args = parser.parse_args(argv)
    if args.steps % args.every or args.every % 10:
        parser.error("--steps must be a multiple of --every, and --every a multiple of 10 (JAX substeps)")
    backends = ("jax", "torch") if args.backend == "both" else (args.backend,)
    results = {b: measure(b, args.steps, args.every, args.images, args.draws, args.config, args.seed)
               for b in backends}
    write_report(results, args.out)


if __name__ == "__main__":
    main()
