"""The PyTorch trainer: DistributedDataParallel training, eval, sampling, and the modes of train_torch.py.

    main(config, workdir, mode)     mode: train | eval | sample | plot (see vdm_common.run)

Processes: one per device. `python train_torch.py` is one process on one device (the first GPU, else the
CPU); `torchrun --nproc_per_node=N train_torch.py ...` starts N, and multi-node runs go through torchrun's
rendezvous (--nnodes, --rdzv_backend=c10d, --rdzv_endpoint=HOST:PORT). `initialize_distributed` joins the
process group from torchrun's environment (nccl on GPUs, gloo on CPUs). Each process loads only its slice of
the global batch (`vdm_common.data.train_batch`, pure in (seed, step)); the model is wrapped in
DistributedDataParallel, which averages the gradients over the processes during backward; every process
then applies the same clipping, AdamW update and EMA to its own copy of the unwrapped model, so the copies
stay identical (the all-reduce gives every process the same gradients). `TrainState.model` and `.ema` are
always the unwrapped VDMs: nothing saved carries `module.` or `_orig_mod.` prefixes. Process 0 writes the
workdir (metrics, checkpoints, samples, eval results); every process reads the checkpoints, so the workdir
must be on a file system all of them see (as for the JAX trainer's orbax checkpoints).

Randomness, all functions of training.seed and the step (`stream_seed` keeps the uses apart):
  init            create_train_state from the seed of stream _STREAM_INIT
  loss noise      `steps.step_generator(seed, step)`, the same on every process, drawn for the GLOBAL batch
                  and sliced per process (`steps.draw_shard_noise`): t stays antithetic over the global batch
  dropout         the default generators reseeded from (seed, step, process) before each step
                  (`steps.seed_dropout`); masks depend on the process count, unlike JAX's (see there)
  eval            batch b draws from stream _STREAM_EVAL, index b, for the global eval batch (times
                  independent per example, as JAX's eval: `eval_noise_config`)
  sampling        stream _STREAM_SAMPLE, index = the step of the params, on process 0 alone
so a resumed run is bit-identical to an uninterrupted one (the checkpoint holds the whole state), and with
model.sm_pdrop = 0 a run on N processes equals a run on 1 up to float32 reassociation of the batch means
(each process averages its B/N examples, DDP averages the N means). Bit-identical on CPUs; on GPUs only
with torch.use_deterministic_algorithms(True) (cuDNN's default convolution backward kernels are not).
The draws differ from the JAX trainer's (torch generators, not JAX keys): the two backends evaluate a
workdir to the same bpd within its standard error, and to float32 rounding with the same injected noise
(`evaluate(noise_fn=...)`).

Speed options (none changes the function being trained): `fused` AdamW (default: where torch has it, CPU and
GPU), `channels_last` memory format, `compile` (torch.compile of the score UNet, see `make_forward`), and
model.compute_dtype = 'bfloat16' (a config field: bf16 autocast inside the score UNet; t, gamma, the loss terms,
parameters, gradients, Adam moments and the EMA stay float32). Attention uses
torch.nn.functional.scaled_dot_product_attention (vdm_torch.unet.AttnBlock).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import time
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
import torch
import torch.distributed as dist
import tqdm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vdm_common import config as config_lib
from vdm_common import data as data_lib
from vdm_common import images as images_lib
from vdm_common import interrupts
from vdm_common import metrics as metrics_lib
from vdm_common import run
from vdm_common import workdir as workdir_lib
from vdm_common.config import ModelConfig
from vdm_common.types import Noise, nats_to_bpd_scale
from vdm_torch import steps, vdm
from vdm_torch.checkpoint import Checkpointer

BACKEND = "torch"
# Streams of the run seed, one per use (so that, e.g., more eval batches never change training); numbered as
# the JAX trainer's. The training noise comes from steps.step_generator(seed, step), the dropout masks from
# steps.seed_dropout, both outside these streams.
_STREAM_INIT, _STREAM_TRAIN, _STREAM_EVAL, _STREAM_SAMPLE = range(4)
# Train metrics of one step, in the order JAX's (sorted) metrics dict has them.
TRAIN_METRICS = ("bpd", "bpd_diff", "bpd_latent", "bpd_recon", "grad_norm", "learning_rate")
# Collectives wait this long for the slowest process (process 0 alone draws the sample grids).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


# ------------------------------------------------------------------------------------------- processes

def torchrun_environment() -> bool:
    """True when started by torchrun (or anything that sets its RANK / WORLD_SIZE / MASTER_ADDR variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when GPUs are present (one process per GPU), else the CPU."""
    return resolve_device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: None -> `default_device()`; 'cuda' without an index -> cuda:LOCAL_RANK
    (torchrun's local rank, so that the processes of a node take one GPU each); anything else as given."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
    return device


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, device: torch.device | str | None = None) -> None:
    """Joins the process group (before anything else touches a device).

    No arguments: from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which covers
    multi-node rendezvous. With coordinator_address='HOST:PORT', num_processes and process_id (the flags of
    train_jax.py): through tcp://HOST:PORT. Backend nccl when this process trains on a GPU, else gloo.
    """
    device = resolve_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise run.RunError("--coordinator_address needs --num_processes and --process_id")
        dist.init_process_group(backend, init_method=f"tcp://{coordinator_address}", world_size=num_processes,
                                rank=process_id, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        if not torchrun_environment():
            raise run.RunError("no process group to join: start the processes with torchrun (which sets RANK, "
                               "WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or pass --coordinator_address, "
                               "--num_processes and --process_id")
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)


def shutdown_distributed() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_index() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_count() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device(device: torch.device) -> torch.device:
    """Where the tensors of collectives live: the GPU for nccl, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_ok(ok: bool, device: torch.device) -> bool:
    """True on every process when `ok` is True on every process (a collective: all must call it)."""
    if process_count() == 1:
        return ok
    flag = torch.tensor([int(ok)], device=_comm_device(device))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _mean_over_processes(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean over processes of a tensor every process holds (same shape everywhere)."""
    if process_count() == 1:
        return values
    values = values.to(_comm_device(device))
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / process_count()


def _all_gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, ...) on every process -> (P B, ...) in process order, on every process."""
    if process_count() == 1:
        return local
    local = local.to(_comm_device(device)).contiguous()
    parts = [torch.empty_like(local) for _ in range(process_count())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ pieces

def stream_seed(seed: int, stream: int, *index: int) -> int:
    """A 63-bit seed for use `stream` of the run, item `index` (a batch, a step, ...), from numpy's SeedSequence."""
    words = [int(seed) % 2**64, int(stream), *(int(i) for i in index)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] % 2**63)


def stream_generator(seed: int, stream: int, *index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by stream_seed(seed, stream, *index)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream, *index))
    return generator


def to_device(images: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Integer images (B, H, W, C) numpy -> (B, C, H, W) tensor on `device`, in NCHW or channels_last memory."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fused_available(device: torch.device, model_config: ModelConfig) -> bool:
    """Whether torch has a fused AdamW for this device and parameter dtype (CPU and CUDA, float32/64)."""
    return device.type in ("cpu", "cuda") and vdm.float_dtype(model_config) in (torch.float32, torch.float64)


def to_channels_last(state: steps.TrainState) -> steps.TrainState:
    """Moves the model, the EMA and the 4-d AdamW moments to channels_last memory (in place; the values and
    the saved state_dicts are the same, only the strides change)."""
    state.model.to(memory_format=torch.channels_last)
    state.ema.to(memory_format=torch.channels_last)
    for per_param in state.optimizer.state.values():
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.dim() == 4:
                per_param[key] = value.contiguous(memory_format=torch.channels_last)
    return state


def make_forward(model: vdm.VDM, device: torch.device, compile: bool = False) -> nn.Module:
    """The module `steps.train_step` calls: DistributedDataParallel(model) when several processes train
    (it averages the gradients in backward), else the model itself. `model` stays the unwrapped module that
    the optimizer, the EMA and the checkpoints use.

    compile: torch.compile the score UNet of `model` in place (`nn.Module.compile`, which leaves the
    parameter names, and so the state_dict, as they are). Not the whole VDM: the continuous-time loss
    differentiates gamma(t) with respect to t inside the forward pass and trains through that derivative
    (a double backward), which compiled autograd graphs do not support.
    """
    if compile:
        model.score_model.compile()
    if process_count() > 1:
        # The VDM has no buffers to synchronise; gradients are written straight into the all-reduce buckets.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    return model


@torch.no_grad()
def eval_bpd_terms(model: vdm.VDM, images: torch.Tensor, conditioning: torch.Tensor, noise: Noise
                   ) -> dict[str, torch.Tensor]:
    """Per-example -ELBO and its three terms, bits/dim, each (B,); dropout off."""
    terms = model.loss_terms(images, conditioning, noise, deterministic=True)
    scale = nats_to_bpd_scale(images.shape[1:])
    return {"bpd": (terms.recon + terms.klz + terms.diff) * scale, "bpd_recon": terms.recon * scale,
            "bpd_latent": terms.klz * scale, "bpd_diff": terms.diff * scale}


def eval_noise_config(model_config: ModelConfig) -> ModelConfig:
    """The model config that eval noise is drawn with: diffusion times independent per example.

    As the JAX trainer's eval: not antithetic, so the per-example values are i.i.d. and their standard error
    is the honest uncertainty of their mean, and the padded rows of the last batch do not squeeze the real
    rows' times into a narrow band (antithetic times spread over the whole padded batch).
    """
    return dataclasses.replace(model_config, antithetic_time_sampling=False)


def evaluate(model: vdm.VDM, dataset: data_lib.Dataset, batch_size: int, num_batches: int,
             device: torch.device, seed: int, channels_last: bool = False, noise_samples: int = 1,
             noise_fn: Callable[[int, int, tuple], Noise] | None = None) -> dict[str, float]:
    """Mean bpd (and terms) over the test split (or its first `num_batches` batches) with the standard error.

    Every process evaluates its rows of each global batch; the per-example values are gathered, so every
    process returns the same result. Each image's value is the mean over `noise_samples` draws of (t, eps);
    draw k of batch b is drawn for the global batch (`eval_noise_config`: times independent per example)
    from stream_generator(seed, _STREAM_EVAL, b) for k = 0, (seed, _STREAM_EVAL, b, k) for k > 0: the same
    draws at every evaluation of a run, whatever the process count. The standard error is over images, of
    their averaged values. noise_fn(b, k, global NCHW shape) -> Noise of the global batch replaces those
    draws (tests inject the JAX trainer's noise with it). The bound is model.config's (see run.eval_bound).
    """
    rank, count = process_index(), process_count()
    noise_config = eval_noise_config(model.config)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in run.EVAL_TERMS}
    for b, (images, conditioning, mask) in enumerate(
            data_lib.eval_batches(dataset, batch_size, rank, count, num_batches)):
        x = to_device(images, device, channels_last)                                   # (B, C, H, W)
        cond = torch.from_numpy(conditioning).to(device)
        rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        sums = None
        for k in range(noise_samples):
            if noise_fn is None:
                generator = stream_generator(seed, _STREAM_EVAL, *((b,) if k == 0 else (b, k)), device=device)
                noise = steps.draw_shard_noise(generator, x.shape, noise_config, (rank, count), device)
            else:
                noise = Noise(*(v[rows].to(device) for v in noise_fn(b, k, (x.shape[0] * count, *x.shape[1:]))))
            terms = eval_bpd_terms(model, x, cond, noise)
            values = torch.stack([terms[name] for name in run.EVAL_TERMS], dim=1).double() / noise_samples  # (B, 4)
            sums = values if sums is None else sums + values
        local = torch.cat([sums, torch.from_numpy(mask).to(device=device, dtype=sums.dtype)[:, None]], dim=1)
        gathered = _all_gather_rows(local, device).cpu().numpy()                       # (P B, 5)
        keep = gathered[:, -1] > 0
        for i, name in enumerate(run.EVAL_TERMS):
            collected[name].append(gathered[keep, i])
    return run.eval_statistics({name: np.concatenate(parts) for name, parts in collected.items()})


def with_bound(model: vdm.VDM, eval_timesteps: int) -> tuple[vdm.VDM, str]:
    """The model whose loss is the bound to report (run.eval_bound: -1 the trained one, 0 continuous time,
    T discrete time with T steps; the same weights) and the bound's tag ('continuous' or 'T<steps>')."""
    config, tag = run.eval_bound(model.config, eval_timesteps)
    if config == model.config:
        return model, tag
    with torch.random.fork_rng(devices=[]):      # the throw-away init must not move the caller's RNG
        other = vdm.VDM(config)
    other = other.to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict(), strict=True)
    return other.requires_grad_(False), tag


@torch.no_grad()
def draw_samples(model: vdm.VDM, num_samples: int, sample_steps: int, image_shape,
                 generator: torch.Generator) -> np.ndarray:
    """num_samples images (N, H, W, C) int32 from z_1 ~ N(0, I) in `sample_steps` ancestral steps.

    Runs on this process's device alone (no collectives: process 0 alone may call it); the draws come from
    `generator` (on the model's device).
    """
    height, width, channels = image_shape
    device = next(model.parameters()).device
    z_1 = torch.randn((num_samples, channels, height, width), generator=generator, dtype=model.float_dtype,
                      device=device)
    images, _ = vdm.sample(model, z_1, sample_steps, torch.zeros(num_samples, device=device), generator)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------------------------ main

def main(config: ml_collections.ConfigDict | None, workdir: str, mode: str = "train",
         overrides: Mapping[str, Any] | None = None, *, device: torch.device | str | None = None,
         compile: bool = False, channels_last: bool = False, fused: bool | None = None,
         profile_steps: int = 0) -> dict:
    """Runs one mode on a workdir (see vdm_common.run). `overrides`: the command line's config overrides,
    applied to the stored config in eval / sample modes. `device`: default cuda:LOCAL_RANK, else the CPU.
    compile / channels_last / fused (None: where available): speed options of training (see the module doc).
    profile_steps: train mode writes a trace of that many steps into <workdir>/profile/.

    Returns a summary dict: train {'step', 'eval', 'samples', 'state', 'interrupted'}, eval: the eval result, sample
    {'path', 'step'}, plot {'path'}.
    """
    run.check_mode(mode)
    if mode == "plot":
        if process_index() != 0:
            return {"path": None}
        path = run.plot(workdir)
        _say(f"wrote {path}")
        return {"path": str(path)}
    config = run.mode_config(mode, workdir, config, overrides)
    options = dict(compile=compile, channels_last=channels_last, fused=fused, profile_steps=profile_steps)
    if mode == "train":
        return train(config, workdir, device=device, **options)
    return _eval_or_sample(config, workdir, mode, device=device, channels_last=channels_last)


class _Run:
    """What every mode sets up: model config, device, data, seeds (checks before anything is written)."""

    def __init__(self, config: ml_collections.ConfigDict, device=None, need_train_batch: bool = True,
                 channels_last: bool = False):
        self.config, t = config, config.training
        self.model_config = config_lib.model_config(config)
        self.device = resolve_device(device)
        self.channels_last = channels_last
        self.rank, self.num_processes = process_index(), process_count()
        self.num_devices = self.num_processes          # one device per process
        self.is_main = self.rank == 0
        if need_train_batch:
            run.check_divisible(t.batch_size_train, self.num_devices, "training.batch_size_train")
        run.check_divisible(t.batch_size_eval, self.num_devices, "training.batch_size_eval")
        self.dataset = self._load_dataset(config.data)
        mc, ds = self.model_config, self.dataset
        if ds.vocab_size != mc.vocab_size or ds.image_shape[-1] != mc.image_channels:
            raise run.RunError(f"data set {ds.name!r} has vocab_size {ds.vocab_size} and {ds.image_shape[-1]} "
                               f"channel(s), but config.model has vocab_size {mc.vocab_size} and image_channels "
                               f"{mc.image_channels}; set config.model to match the data")

    def _load_dataset(self, data_config) -> data_lib.Dataset:
        """Process 0 loads first (it may prepare a tfds data set into data_dir), then the others."""
        loaded = {}
        _on_main_process(lambda: loaded.setdefault("dataset", data_lib.load_dataset(data_config)),
                         "load the data set", self.device)
        return loaded["dataset"] if self.is_main else data_lib.load_dataset(data_config)

    @functools.cached_property
    def baseline_bpd(self) -> float:
        """Test bpd of independent per-pixel categoricals fit on the training split (the number to beat)."""
        return data_lib.pixel_baseline_bpd(self.dataset)

    def images(self, images: np.ndarray) -> torch.Tensor:
        return to_device(images, self.device, self.channels_last)

    def sample_grid(self, workdir: str, model: vdm.VDM, step: int):
        """Draws and writes the sample grid of `step` (process 0); returns its path (None elsewhere)."""
        if not self.is_main:
            return None
        t = self.config.training
        samples = draw_samples(model, t.num_samples, t.sample_steps, self.dataset.image_shape,
                               stream_generator(t.seed, _STREAM_SAMPLE, step, device=self.device))
        return images_lib.save_image_grid(run.sample_grid_path(workdir, step, t.num_samples, t.sample_steps),
                                          samples, self.model_config.vocab_size)


def _say(message: str) -> None:
    """Prints on process 0, above the progress bar if one is showing."""
    if process_index() == 0:
        tqdm.tqdm.write(message)


def _on_main_process(fn: Callable[[], Any], what: str, device: torch.device) -> None:
    """Runs fn on process 0 and lets every process know whether it succeeded (other processes raise too)."""
    error = None
    if process_index() == 0:
        try:
            fn()
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
    ok = _all_ok(error is None, device)
    if error is not None:
        raise error
    if not ok:
        raise run.RunError(f"process 0 failed to {what}; see its output")


def _agreed_signal(stop: interrupts.StopSignals, device: torch.device) -> str | None:
    """The stop signal any process has received, or None: every process stops at the same step."""
    received = stop.received or 0
    if process_count() > 1:
        flag = torch.tensor([received], device=_comm_device(device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
    return interrupts.signal_name(received)


class Profiler:
    """--profile: a torch.profiler trace of about `steps` training steps into <workdir>/profile/:
    trace_rank<R>.json (chrome://tracing or Perfetto) and summary_rank<R>.txt (the operators by time).
    Tracing starts after the first call (with --compile, the one that compiles) and covers whole calls
    (training.substeps steps each)."""

    def __init__(self, workdir: str, steps: int, device: torch.device, rank: int):
        self.directory = workdir_lib.layout(workdir).profile
        self.steps, self.rank, self.first = steps, rank, None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self._profile = torch.profiler.profile(activities=activities)
        self.tracing = False

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        if self.tracing:
            self._profile.stop()
            self.tracing = False

    def after(self, step: int) -> None:
        """Called after each training call with the step reached."""
        if self.first is None:
            self._profile.start()
            self.first, self.tracing = step, True
        elif self.tracing and step - self.first >= self.steps:
            self._profile.stop()
            self.tracing = False
            self.directory.mkdir(exist_ok=True)
            self._profile.export_chrome_trace(str(self.directory / f"trace_rank{self.rank}.json"))
            table = self._profile.key_averages().table(sort_by=self.sort_by, row_limit=30)
            (self.directory / f"summary_rank{self.rank}.txt").write_text(table + "\n")
            _say(f"profile of steps {self.first}..{step}: {self.directory}")


def train(config: ml_collections.ConfigDict, workdir: str, device=None, *, compile: bool = False,
          channels_last: bool = False, fused: bool | None = None, profile_steps: int = 0) -> dict:
    """Trains to training.num_steps_train, resuming from the latest checkpoint of the workdir.

    Stops early, after saving a checkpoint, on SIGTERM / SIGINT (summary['interrupted'] names the signal).
    profile_steps > 0: write a trace of that many steps (`Profiler`)."""
    r = _Run(config, device, channels_last=channels_last)
    t, opt, mc, ds = config.training, config.optimizer, r.model_config, r.dataset
    fused = fused_available(r.device, mc) if fused is None else fused
    with contextlib.ExitStack() as stack:
        # Lock first: a run refused because another holds the workdir writes nothing.
        _on_main_process(lambda: stack.enter_context(workdir_lib.workdir_lock(workdir)), "lock the workdir",
                         r.device)
        _on_main_process(lambda: workdir_lib.prepare_workdir(workdir, config, BACKEND), "prepare the workdir",
                         r.device)
        ckpt = Checkpointer(workdir, mc, t.checkpoints_to_keep, read_only=not r.is_main)
        stack.callback(ckpt.close)
        if r.is_main:
            run.remove_partial_writes(workdir, say=_say)
        restored = ckpt.restore_latest(opt, r.device, fused, restore_rng=True, say=_say)
        if restored is None:
            state = steps.create_train_state(mc, opt, stream_seed(t.seed, _STREAM_INIT, 0), r.device, fused)
        else:
            state, latest = restored
            _say(f"resumed from step {latest[0]} ({latest[1]} checkpoint in {workdir_lib.layout(workdir).checkpoints})")
        if channels_last:
            to_channels_last(state)
        step = state.step
        num_params = count_params(state.model)
        per_device = t.batch_size_train // r.num_devices
        _say(run.describe_start(
            backend=BACKEND, num_params=num_params,
            memory_bytes=metrics_lib.training_memory_estimate(mc, num_params, ds.image_shape, per_device),
            num_devices=r.num_devices, num_processes=r.num_processes, batch_per_device=per_device,
            global_batch=t.batch_size_train, dataset_name=ds.name, num_train=len(ds.train), num_test=len(ds.test),
            image_shape=ds.image_shape, baseline_bpd=r.baseline_bpd))
        if step >= t.num_steps_train:
            _say(f"the run is at step {step}, training.num_steps_train = {t.num_steps_train}: nothing to train "
                 f"(raise --config.training.num_steps_train to continue)")
        writer = stack.enter_context(metrics_lib.MetricsWriter(workdir, enabled=r.is_main))
        summary = _train_loop(r, workdir, state, ckpt, writer, stack, compile, profile_steps)
    if r.is_main:
        run.plot(workdir)
        _say(run.describe_outputs(workdir))
    return summary


def _train_loop(r: _Run, workdir: str, state: steps.TrainState, ckpt: Checkpointer,
                writer: metrics_lib.MetricsWriter, stack: contextlib.ExitStack, compile: bool,
                profile_steps: int) -> dict:
    t, opt, mc, ds, device = r.config.training, r.config.optimizer, r.model_config, r.dataset, r.device
    forward = make_forward(state.model, device, compile)
    shard = (r.rank, r.num_processes)
    total, step = t.num_steps_train, state.step

    def crossed(period: int, before: int, after: int) -> bool:
        return period > 0 and after // period > before // period

    def run_steps(start: int, n: int) -> tuple[dict[str, float], list[float]]:
        """Steps start..start+n-1; returns their metrics (means over the applied steps, averaged over the
        processes; `skipped` summed) and a skipped flag per step.

        The metrics reach the host once per call (every training.substeps steps, as the JAX trainer's).
        """
        sums, skipped = None, []
        for s in range(start, start + n):
            images, conditioning = data_lib.train_batch(ds, t.seed, s, t.batch_size_train, *shard)
            steps.seed_dropout(t.seed, s, r.rank)
            metrics = steps.train_step(mc, opt, state, r.images(images), torch.from_numpy(conditioning).to(device),
                                       generator=steps.step_generator(t.seed, s, device), forward=forward,
                                       shard=shard)
            skipped.append(float(metrics["skipped"]))       # the step itself already read it on the host
            if skipped[-1]:
                continue
            values = torch.stack([metrics[name].to(device=device, dtype=torch.float64) for name in TRAIN_METRICS])
            sums = values if sums is None else sums + values
        applied = n - sum(skipped)
        means = (_mean_over_processes(sums / applied, device).tolist() if applied
                 else [float("nan")] * len(TRAIN_METRICS))
        return dict(zip(TRAIN_METRICS, means), skipped=float(sum(skipped))), skipped

    bar = metrics_lib.ProgressBar(total, initial_step=step, enabled=r.is_main)
    stack.callback(bar.close)
    stop = stack.enter_context(interrupts.StopSignals(say=_say))
    nonfinite = interrupts.NonFiniteSteps(t.max_nonfinite_steps, workdir_lib.layout(workdir).checkpoints)
    profiler = stack.enter_context(Profiler(workdir, profile_steps, device, r.rank)) if profile_steps else None
    # steps/s counts the training calls only (not eval, sampling, checkpointing); with --compile the first
    # window includes the compilation.
    window = metrics_lib.Window()
    last_eval, last_grid, interrupted = None, None, None
    last_saved = step if step > 0 else None             # a run at step > 0 was restored from that step
    while step < total:
        n = min(t.substeps - step % t.substeps, total - step)      # realigns to substeps after an odd resume
        started = time.time()
        values, skipped = run_steps(step, n)
        before, step = step, step + n
        nonfinite.update(before, skipped, last_saved)
        window.add(values, n, time.time() - started)
        if profiler:
            profiler.after(step)
        bar.update(step, values["bpd"])
        final = step == total
        if crossed(t.steps_per_logging, before, step) or final:
            writer.write(step, "train", **window.flush())
        if crossed(t.steps_per_eval, before, step) or final:
            result = evaluate(state.ema, ds, t.batch_size_eval, t.num_eval_batches, device, t.seed, r.channels_last)
            writer.write(step, "eval", **{k: v for k, v in result.items() if k != "num_examples"})
            last_eval = dict(result, step=step, bound=run.eval_bound(mc, -1)[1])
            _say(f"step {step}: eval bpd {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
                 f"({result['num_examples']} test images, EMA params)")
        if crossed(t.steps_per_sample, before, step) or (final and t.steps_per_sample > 0):
            last_grid = r.sample_grid(workdir, state.ema, step)
        interrupted = _agreed_signal(stop, device)
        if crossed(t.steps_per_save, before, step) or final or (interrupted and last_saved != step):
            _on_main_process(lambda: ckpt.save(step, state), f"save checkpoint step {step}", device)
            last_saved = step
        if interrupted:
            _say(f"stopped by {interrupted} at step {step}; saved checkpoint step {step} in "
                 f"{workdir_lib.layout(workdir).checkpoints}. Run the same command again to resume.")
            break
    bar.close()
    ckpt.wait()
    if device.type == "cuda" and r.is_main:
        _say(f"peak GPU memory of process 0: {metrics_lib.format_bytes(torch.cuda.max_memory_allocated(device))}")
    if last_eval is not None:
        last_eval["baseline_bpd"] = r.baseline_bpd
        _say(f"final {run.format_eval(last_eval)}")
    if last_grid is not None:
        _say(f"samples: {last_grid}")
    return {"step": step, "eval": last_eval, "samples": str(last_grid) if last_grid else None, "state": state,
            "interrupted": interrupted}


def _eval_or_sample(config: ml_collections.ConfigDict, workdir: str, mode: str, device=None,
                    channels_last: bool = False) -> dict:
    """eval: the EMA params of the latest checkpoint on the whole test split (+ baseline) -> eval/step_N.json;
    sample: a grid of training.num_samples samples in training.sample_steps steps -> samples/.

    The latest checkpoint may be this backend's (torch file) or the JAX trainer's (its neutral export):
    the weights are converted on the fly."""
    r = _Run(config, device, need_train_batch=False, channels_last=channels_last)
    ckpt = Checkpointer(workdir, r.model_config, config.training.checkpoints_to_keep, read_only=True)
    restored = ckpt.restore_latest(config.optimizer, r.device, fresh_optimizer=True, say=_say)
    if restored is None:
        raise run.RunError(f"{workdir_lib.layout(workdir).checkpoints} holds no checkpoint; train first "
                           f"(--mode=train --workdir={workdir})")
    state, latest = restored
    if channels_last:
        to_channels_last(state)
    step = latest[0]                 # the checkpoint's step (a state without optimizer restarts its count)
    if mode == "sample":
        path = r.sample_grid(workdir, state.ema, step)
        _say(f"wrote {config.training.num_samples} samples ({config.training.sample_steps} steps) of step {step}: "
             f"{path}")
        return {"path": str(path) if path else None, "step": step}
    t = config.training
    model, bound = with_bound(state.ema, t.eval_timesteps)
    result = evaluate(model, r.dataset, t.batch_size_eval, 0, r.device, t.seed, channels_last, t.eval_noise_samples)
    result = dict(result, step=step, params="ema", backend=BACKEND, checkpoint=latest[1], bound=bound,
                  noise_samples=t.eval_noise_samples, baseline_bpd=r.baseline_bpd)
    if r.is_main:
        path = run.write_eval_result(workdir, result, trained_tag=run.eval_bound(r.model_config, -1)[1])
        _say(f"{run.format_eval(result)}\nwrote {path}")
    return result
