"""Workers that time the upstream VDM code beside ours; benchmarks/bench.py runs them for --official / --port.

  official  google-research/vdm (JAX / Flax). PATH holds `vdm/model_vdm.py` and `vdm/train_state.py` (its
            modules import each other as `vdm.*`), or is a clone named `vdm` itself.
  port      addtt/variational-diffusion-models (PyTorch). PATH holds `vdm.py`, `vdm_unet.py` and the
            `utils.py` they import (its own pulls in accelerate, torchinfo and torchvision for its training
            script; a utils.py with just the three helpers the model uses, zero_init, maybe_unpack_batch and
            unsqueeze_right, does as well).

Their code is not copied here: the worker imports it from the checkout, builds their model with the
config bench.py times ours on, and drives it with a training step written below that follows each
project's own trainer:

  official  `Experiment_VDM.loss_fn` (bpd of the batch, dropout on) and `Experiment.train_step` (their
            `TrainState.apply_gradients`: AdamW, then the EMA), jitted with the state donated, as our worker;
            without the pmap over devices and the lax.scan over substeps of their multi-device loop.
  port      its `VDM.forward` loss, `backward`, clipping when configured, `torch.optim.AdamW` over all
            parameters (as its train.py), and an EMA update of every parameter (its Trainer's ema.update()).

The optimizer settings are our configs' defaults (vdm_common/config.py), as in our workers. Their training
scripts (data pipelines, clu, accelerate) are not imported. Timing as our workers (bench.py's helpers):
the same batch, median [min, max] of N steps after warm-up; one sampling step of 1000 and an eval batch
of the EMA model as each project's own sampler and eval compute them. float32 only: their earlier figures
were measured there.

Shims for today's packages, applied at import and only where needed (the official code targets JAX 0.3):
  - `chex`: model_vdm.py imports it for type annotations only, and it is no longer installed with optax:
    a stub module with `chex.Array`.
  - `jax.tree_multimap`: removed in JAX 0.3.16, and train_state.py's EMA update calls it:
    `jax.tree_util.tree_map`, which it was an alias of.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import types

import numpy as np

from benchmarks.bench import (BASE_MODEL, SIZES, jax_device_figures, jax_timed, model_for, summarise,
                              torch_device_figures, torch_timed)
from vdm_common.config import ModelConfig, make_config
from vdm_common.upstream.port import PORT_SCHEDULES

SAMPLE_STEPS = 1000      # T of the ancestral sampler whose steps are timed, as in our workers


def checkout_name(checkout: str) -> str:
    """The checkout's folder name: what the results record (not where it lies on this machine)."""
    return os.path.basename(os.path.normpath(os.path.abspath(checkout)))


def check_float32(dtype: str) -> None:
    if dtype != "float32":
        raise ValueError(f"the upstream code is timed in float32 only, not {dtype}")


# ------------------------------------------------------------------------------------------ official worker
def official_root(checkout: str) -> str:
    """The sys.path entry under which a checkout of google-research/vdm imports as `vdm`."""
    path = os.path.abspath(checkout)
    if os.path.isfile(os.path.join(path, "vdm", "model_vdm.py")):
        return path
    if os.path.basename(path) == "vdm" and os.path.isfile(os.path.join(path, "model_vdm.py")):
        return os.path.dirname(path)
    raise FileNotFoundError(f"{checkout} holds no vdm/model_vdm.py: pass a clone of google-research/vdm named "
                            "vdm, or the folder that holds it")


def install_official_shims() -> None:
    """The two names the official code uses that today's packages lack (see the module docstring)."""
    import jax

    if importlib.util.find_spec("chex") is None:
        stub = types.ModuleType("chex")
        stub.Array = jax.Array
        sys.modules["chex"] = stub
    if not hasattr(jax, "tree_multimap"):
        jax.tree_multimap = jax.tree_util.tree_map


def official_config(model_vdm, mc: ModelConfig):
    """Their VDMConfig for our model config; refuses fields their code fixes to other values."""
    fixed = dict(fourier_start=6, fourier_stop=8, fourier_order="channel_major", attention_heads=1,
                 norm_groups=32, norm_eps=1e-6, image_channels=3, compute_dtype="float32")
    differ = {name: getattr(mc, name) for name, value in fixed.items() if getattr(mc, name) != value}
    if differ:
        raise ValueError(f"the official code fixes {sorted(differ)} to {[fixed[n] for n in sorted(differ)]}")
    names = ("vocab_size", "sample_softmax", "antithetic_time_sampling", "with_fourier_features", "with_attention",
             "gamma_type", "gamma_min", "gamma_max", "sm_n_timesteps", "sm_n_embd", "sm_n_layer", "sm_pdrop")
    return model_vdm.VDMConfig(**{name: getattr(mc, name) for name in names})


def official_worker(checkout: str, size: str, dtype: str, steps: int, warmup: int) -> dict:
    check_float32(dtype)
    install_official_shims()
    sys.path.insert(0, official_root(checkout))
    import jax
    import jax.numpy as jnp
    import optax
    from vdm import model_vdm, train_state

    mc, spec = model_for(size, dtype), SIZES[size]
    opt = make_config(BASE_MODEL).optimizer
    batch, image = spec["batch"], spec["image"]
    model = model_vdm.VDM(official_config(model_vdm, mc))
    x = jax.random.randint(jax.random.PRNGKey(1), (batch, *image), 0, 256)      # our JAX worker's batch
    c = jnp.zeros((batch,))
    params_rng, sample_rng = jax.random.split(jax.random.PRNGKey(0))
    variables = model.init({"params": params_rng, "sample": sample_rng}, images=jnp.zeros((2, *image), "uint8"),
                           conditioning=jnp.zeros((2,)))

    def decay_mask(params):
        # Their decay_mask_fn: every leaf but biases (it also spares layer-norm scales, which the VDM has none of).
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)

    def optimizer(lr):
        # Their Experiment.get_optimizer, with our optimizer defaults as its config.
        adamw = optax.adamw(learning_rate=lr, mask=decay_mask, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.weight_decay)
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw) if opt.grad_clip_norm > 0 else adamw

    lr_schedule = optax.linear_schedule(0.0, opt.learning_rate, opt.num_steps_lr_warmup)   # their warm-up, no decay
    state = train_state.TrainState.create(apply_fn=model.apply, variables=variables, optax_optimizer=optimizer)

    def loss_fn(params, images, rng, is_train):
        # Their Experiment_VDM.loss_fn, without the metrics dict.
        rng, sample_rng = jax.random.split(rng)
        rngs = {"sample": sample_rng}
        if is_train:
            rng, dropout_rng = jax.random.split(rng)
            rngs["dropout"] = dropout_rng
        outputs = state.apply_fn({"params": params}, images=images, conditioning=c, rngs=rngs,
                                 deterministic=not is_train)
        rescale_to_bpd = 1.0 / (np.prod(images.shape[1:]) * np.log(2.0))
        terms = (outputs.loss_klz, outputs.loss_recon, outputs.loss_diff)
        return sum(jnp.mean(term) for term in terms) * rescale_to_bpd

    base_rng = jax.random.PRNGKey(2)

    def train_step(state, images):
        # Their Experiment.train_step on one device.
        rng = jax.random.fold_in(base_rng, state.step)
        bpd, grads = jax.value_and_grad(loss_fn)(state.params, images, rng, True)
        return state.apply_gradients(grads=grads, lr=lr_schedule(state.step), ema_rate=opt.ema_rate), bpd

    step = jax.jit(train_step, donate_argnums=0)
    holder = {"state": state}

    def one_step():
        holder["state"], bpd = step(holder["state"], x)
        return bpd

    jax_timed(one_step, warmup)
    _, train_times = jax_timed(one_step, steps)

    ema = holder["state"].ema_params
    z = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    sample_step = jax.jit(lambda p, z, i: model.apply({"params": p}, i=i, T=SAMPLE_STEPS, z_t=z, conditioning=c,
                                                      rng=base_rng, method=model.sample))
    jax_timed(lambda: sample_step(ema, z, 0), warmup)
    _, sample_times = jax_timed(lambda: sample_step(ema, z, 1), steps)
    eval_fn = jax.jit(lambda p, x: loss_fn(p, x, base_rng, False))
    jax_timed(lambda: eval_fn(ema, x), warmup)
    _, eval_times = jax_timed(lambda: eval_fn(ema, x), steps)
    return dict(train=summarise(train_times), sample=summarise(sample_times), eval=summarise(eval_times),
                version=jax.__version__, checkout=checkout_name(checkout), **jax_device_figures(dtype))


# ---------------------------------------------------------------------------------------------- port worker
def port_config(mc: ModelConfig, batch: int, opt) -> types.SimpleNamespace:
    """The port's TrainConfig fields for our model config and optimizer (its code reads them as attributes)."""
    schedules = {ours: theirs for theirs, ours in PORT_SCHEDULES.items()}
    if mc.gamma_type not in schedules or mc.sm_n_timesteps:
        raise ValueError(f"the port has continuous-time {sorted(schedules)} schedules only, not {mc.gamma_type} "
                         f"with T = {mc.sm_n_timesteps}")
    return types.SimpleNamespace(
        embedding_dim=mc.sm_n_embd, n_blocks=mc.sm_n_layer, n_attention_heads=mc.attention_heads,
        dropout_prob=mc.sm_pdrop, norm_groups=mc.norm_groups, input_channels=mc.image_channels,
        use_fourier_features=mc.with_fourier_features, attention_everywhere=mc.with_attention, batch_size=batch,
        noise_schedule=schedules[mc.gamma_type], gamma_min=mc.gamma_min, gamma_max=mc.gamma_max,
        antithetic_time_sampling=mc.antithetic_time_sampling, lr=opt.learning_rate,
        weight_decay=opt.weight_decay, clip_grad_norm=opt.grad_clip_norm > 0)


def port_worker(checkout: str, size: str, dtype: str, steps: int, warmup: int) -> dict:
    check_float32(dtype)
    missing = [name for name in ("vdm.py", "vdm_unet.py") if not os.path.isfile(os.path.join(checkout, name))]
    if missing:
        raise FileNotFoundError(f"{checkout} holds no {missing}: pass a checkout of addtt/variational-diffusion-models")
    sys.path.insert(0, os.path.abspath(checkout))
    import torch
    from vdm import VDM
    from vdm_unet import UNetVDM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mc, spec = model_for(size, dtype), SIZES[size]
    opt = make_config(BASE_MODEL).optimizer
    batch, (H, W, C) = spec["batch"], spec["image"]
    cfg = port_config(mc, batch, opt)
    torch.manual_seed(0)
    model = VDM(UNetVDM(cfg), cfg, image_shape=(C, H, W)).to(device)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, betas=(opt.b1, opt.b2), weight_decay=cfg.weight_decay,
                                  eps=opt.eps)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, C, H, W), generator=generator, device=device)    # our torch worker's batch
    images = x / (mc.vocab_size - 1)                        # the port takes k / 255 in [0, 1] (torchvision's)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def one_step():
        # The body of its Trainer.train loop on one process.
        optimizer.zero_grad()
        loss, _ = model(images)
        loss.backward()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, opt.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - opt.ema_rate)

    torch_timed(one_step, warmup, device)
    train_times = torch_timed(one_step, steps, device)
    # Its sampler steps from t to s on the grid linspace(1, 0, T + 1); unclipped, the official update as ours.
    grid = torch.linspace(1.0, 0.0, SAMPLE_STEPS + 1, device=device)
    z = torch.randn(x.shape, generator=generator, device=device)
    torch_timed(lambda: ema.sample_p_s_t(z, grid[0], grid[1], clip_samples=False), warmup, device)
    sample_times = torch_timed(lambda: ema.sample_p_s_t(z, grid[1], grid[2], clip_samples=False), steps, device)
    with torch.no_grad():                                   # its Trainer.eval -> evaluate_model on the EMA model
        torch_timed(lambda: ema(images), warmup, device)
        eval_times = torch_timed(lambda: ema(images), steps, device)
    return dict(train=summarise(train_times), sample=summarise(sample_times), eval=summarise(eval_times),
                version=torch.__version__, checkout=checkout_name(checkout), **torch_device_figures(dtype, device))


WORKERS = {"official": official_worker, "port": port_worker}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(WORKERS), required=True)
    parser.add_argument("--checkout", required=True, help="local checkout of the upstream code")
    parser.add_argument("--sizes", default="small", help=f"one of {sorted(SIZES)}")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(WORKERS[args.worker](args.checkout, args.sizes, args.dtypes, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
