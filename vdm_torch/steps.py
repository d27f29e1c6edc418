"""Training state and the step functions of the PyTorch trainer (no I/O, no process-group decisions).

The update is the official one, written to match `vdm_jax/steps.py` (optax) exactly: loss = bpd of the
batch, AdamW with weight decay on every parameter but biases, LR warmup linear from 0, optional
global-norm clipping with optax's formula (no 1e-6 added to the norm, unlike torch's clip_grad_norm_),
EMA `ema + (1 - rate)(params - ema)` kept on the unwrapped model.

Data parallelism (DistributedDataParallel, see `vdm_torch.train`): each process calls `train_step` on its
slice of the global batch with `shard=(process index, process count)`. The loss noise is drawn for the
GLOBAL batch from a generator in the same state on every process (`step_generator`) and each process keeps
its rows (`draw_shard_noise`), as the JAX step draws it for the global batch inside `jax.jit`: t stays
antithetic over the global batch and the numbers do not depend on the number of processes.
"""
from __future__ import annotations

import copy
import dataclasses

import ml_collections
import numpy as np
import torch
from torch import nn

from vdm_common.config import ModelConfig
from vdm_common.types import Noise, bits_per_dim, nats_to_bpd_scale
from vdm_torch.vdm import VDM, draw_noise, init_params

_DROPOUT_STREAM = 0x64726F70     # keeps the dropout seeds apart from other SeedSequence uses of the same seed


@dataclasses.dataclass
class TrainState:
    """step: steps done (the next batch is step's); model: the trained VDM (unwrapped); ema: its EMA copy;
    optimizer: AdamW; updates: the updates AdamW applied (= step unless steps were skipped for a non-finite
    loss or gradient; the LR schedule reads it, as optax's count in JAX), by default read from the optimizer."""

    step: int
    model: VDM
    ema: VDM
    optimizer: torch.optim.AdamW
    updates: int | None = None

    def __post_init__(self):
        if self.updates is None:
            self.updates = adam_count(self.optimizer)


def adam_count(optimizer: torch.optim.Optimizer) -> int:
    """The updates an AdamW has applied: its per-parameter `step` (0 before the first)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """True for parameters that get weight decay: all but those named `bias` (the official mask)."""
    return {name: name.rsplit(".", 1)[-1] != "bias" for name, _ in model.named_parameters()}


def learning_rate(opt: ml_collections.ConfigDict):
    """LR after `count` updates: linear warmup from 0 to learning_rate over num_steps_lr_warmup, then flat."""
    warmup = opt.num_steps_lr_warmup

    def schedule(count: int) -> float:
        if warmup == 0:
            return float(opt.learning_rate)
        return opt.learning_rate * min(count / warmup, 1.0)
    return schedule


def make_optimizer(model: nn.Module, opt: ml_collections.ConfigDict, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over two groups (decayed, not decayed), in the model's parameter order."""
    mask = decay_mask(model)
    decay = [p for n, p in model.named_parameters() if mask[n]]
    no_decay = [p for n, p in model.named_parameters() if not mask[n]]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate(opt)(0), betas=(opt.b1, opt.b2), eps=opt.eps, fused=fused)


def create_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, seed: int,
                       device: torch.device | str = "cpu", fused: bool | None = None) -> TrainState:
    """Fresh parameters (from seed), EMA equal to them, an AdamW without moments yet, step 0."""
    model = init_params(model_config, seed).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    return TrainState(step=0, model=model, ema=ema, optimizer=make_optimizer(model, opt, fused))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a global step's noise: seeded by (seed, step), identical on every rank."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return generator


def draw_shard_noise(generator: torch.Generator | None, local_shape, model_config: ModelConfig,
                     shard: tuple[int, int] = (0, 1), device=None) -> Noise:
    """The noise of this process's rows of a global batch: draws (t, eps, eps_0) for the global batch of
    count * B images (vdm.draw_noise) and returns rows [index * B, (index + 1) * B).

    local_shape: (B, C, H, W) of this process's images; shard: (index, count). Every process must pass a
    generator in the same state. shard=(0, 1) is exactly draw_noise(generator, local_shape, ...).
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: the index must be in [0, count)")
    batch = local_shape[0]
    noise = draw_noise(generator, (batch * count, *local_shape[1:]), model_config, device=device)
    rows = slice(index * batch, (index + 1) * batch)
    return Noise(*(x[rows] for x in noise))


def seed_dropout(seed: int, step: int, process_index: int = 0) -> None:
    """Seeds the default generators (CPU and every GPU) for the dropout masks of step `step` on one process.

    torch's dropout draws from the default generators, which take no per-call generator: seeding them from
    (seed, step, process) makes every step's masks a function of the step, so a resumed run draws the masks
    an uninterrupted one draws. Unlike the JAX step (masks drawn for the global batch), the masks depend on
    the process count: with dropout on, an N-process run follows a different (equally valid) trajectory
    from a 1-process one; with model.sm_pdrop = 0 they agree.
    """
    words = np.random.SeedSequence([_DROPOUT_STREAM, int(seed) % 2**64, int(step), int(process_index)])
    torch.manual_seed(int(words.generate_state(1, np.uint64)[0] % 2**63))


def clip_by_global_norm_(params, max_norm: float) -> torch.Tensor:
    """Scales gradients by min(1, max_norm / norm) in place (optax's formula); returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm > 0:
        scale = torch.where(norm < max_norm, torch.ones_like(norm), max_norm / norm)
        torch._foreach_mul_(grads, scale)
    return norm


@torch.no_grad()
def update_ema_(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- ema + (1 - rate) (params - ema), parameter by parameter."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - rate)


def train_step(model_config: ModelConfig, opt: ml_collections.ConfigDict, state: TrainState, images,
               conditioning, generator: torch.Generator | None = None, noise: Noise | None = None,
               deterministic: bool | None = None, forward: nn.Module | None = None,
               shard: tuple[int, int] = (0, 1)) -> dict:
    """One optimizer step on images (B, C, H, W), conditioning (B,); updates `state` in place.

    noise: injected draws for these B images (parity tests); None draws them from `generator`.
    deterministic: dropout off; defaults to model.sm_pdrop == 0.
    forward: the module to call (a DistributedDataParallel wrapper of state.model, which averages the
    gradients); default state.model.
    shard: (index, count) when the images are process `index`'s rows of a global batch split over `count`
    processes: the noise is then drawn for the global batch and sliced (`draw_shard_noise`).
    The loss is the mean over the B LOCAL images. DDP averages the gradients over the processes, which is
    the gradient of the global batch mean only because every process holds the same number of images
    (vdm_common.data.train_batch splits the global batch evenly, and the trainer refuses a batch size that
    does not divide). Metrics are this process's (the trainer averages them over processes).
    A step whose loss or gradient norm is not finite (on any process) is skipped: model, EMA and AdamW stay
    as they were and only `step` advances, to the next batch (as `vdm_jax.steps.train_step`).
    Returns metrics bpd, its parts, grad_norm (before clipping), learning_rate, skipped (1.0 or 0.0), as 0-d
    tensors.
    """
    if noise is None:
        noise = draw_shard_noise(generator, images.shape, model_config, shard, device=images.device)
    if deterministic is None:
        deterministic = model_config.sm_pdrop == 0
    lr = learning_rate(opt)(state.updates)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    forward = state.model if forward is None else forward
    state.optimizer.zero_grad(set_to_none=True)
    parts = bits_per_dim(forward(images, conditioning, noise, deterministic), images.shape[1:])
    parts["bpd"].backward()
    grad_norm = clip_by_global_norm_(list(state.model.parameters()), opt.grad_clip_norm)
    if all_finite(parts["bpd"].detach(), grad_norm, shard[1]):
        state.optimizer.step()
        update_ema_(state.ema, state.model, opt.ema_rate)
        state.updates += 1
        skipped = 0.0
    else:
        skipped = 1.0
    state.step += 1
    metrics = {k: v.detach() for k, v in parts.items()}
    metrics.update(grad_norm=grad_norm.detach(), learning_rate=torch.tensor(lr, device=grad_norm.device),
                   skipped=torch.tensor(skipped, device=grad_norm.device))
    return metrics


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, num_processes: int = 1) -> bool:
    """Whether a step may be applied: this process's loss and the (all-reduced, so global) gradient norm are
    finite, on every process. Reading it on the host synchronises with the device once per step."""
    finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).to(torch.int32)
    if num_processes > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


@torch.no_grad()
def eval_terms(model: VDM, images, conditioning, noise: Noise) -> dict:
    """Per-example -ELBO and its three terms in bits/dim, {'bpd', 'bpd_recon', 'bpd_latent', 'bpd_diff'}
    each (B,), with the injected noise (vdm_common.noise draws it for eval), dropout off: the eval quantity."""
    terms = model.loss_terms(images, conditioning, noise, deterministic=True)
    scale = nats_to_bpd_scale(images.shape[1:])
    return {"bpd": (terms.recon + terms.klz + terms.diff) * scale, "bpd_recon": terms.recon * scale,
            "bpd_latent": terms.klz * scale, "bpd_diff": terms.diff * scale}
