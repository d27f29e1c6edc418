"""The PyTorch engine: the framework work of training, eval and sampling (vdm_common.engine), one process
per device.

Processes: `python train_torch.py` is one process on one device (the first GPU, else the CPU); `torchrun
--nproc_per_node=N train_torch.py ...` starts N, and multi-node runs go through torchrun's rendezvous
(--nnodes, --rdzv_backend=c10d, --rdzv_endpoint=HOST:PORT). `initialize_distributed` joins the process group
(nccl on GPUs, gloo on CPUs). Each process trains on its rows of the global batch; the model is wrapped in
DistributedDataParallel, which averages the gradients during backward; every process then applies the same
clipping, AdamW update and EMA to its own copy of the unwrapped model, so the copies stay identical.
`TrainState.model` and `.ema` are always the unwrapped VDMs: nothing saved carries `module.` or `_orig_mod.`
prefixes. Process 0 writes the checkpoints; every process reads them, so the workdir must be on a file
system all of them see (as for the JAX engine's orbax checkpoints).

Randomness, all functions of training.seed and the step (`stream_seed` keeps the uses apart):
  init            create_train_state from the seed of stream _STREAM_INIT
  loss noise      `steps.step_generator(seed, step)`, the same on every process, drawn for the GLOBAL batch
                  and sliced per process (`steps.draw_shard_noise`): t stays antithetic over the global batch
  dropout         the default generators reseeded from (seed, step, process) before each step
                  (`steps.seed_dropout`); masks depend on the process count, unlike JAX's (see there)
  eval, sampling  from the host (vdm_common.noise), as in the JAX engine: the same numbers in both
so a resumed run is bit-identical to an uninterrupted one, and with model.sm_pdrop = 0 a run on N processes
equals a run on 1 up to float32 reassociation of the batch means. Bit-identical on CPUs; on GPUs only with
torch.use_deterministic_algorithms(True) (cuDNN's default convolution backward kernels are not).

Speed options (`EngineOptions`; none changes the function trained): fused AdamW (default where torch has it),
channels_last memory, torch.compile of the score UNet, and the config's model.compute_dtype = 'bfloat16'
(bf16 autocast inside the UNet; t, gamma, the loss terms, parameters, gradients, Adam moments and the EMA
stay float32).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vdm_common import config as config_lib
from vdm_common import metrics as metrics_lib
from vdm_common import run
from vdm_common.config import ModelConfig
from vdm_common.engine import on_main_process
from vdm_common.types import Noise
from vdm_torch import convert, steps, vdm
from vdm_torch.checkpoint import Checkpointer

BACKEND = "torch"
# Streams of the run seed, one per use; numbered as the JAX engine's. The training noise comes from
# steps.step_generator(seed, step), the dropout masks from steps.seed_dropout, both outside these streams.
_STREAM_INIT = 0
# Train metrics of one step, in the order JAX's (sorted) metrics dict has them.
TRAIN_METRICS = ("bpd", "bpd_diff", "bpd_latent", "bpd_recon", "grad_norm", "learning_rate")
# Collectives wait this long for the slowest process (process 0 alone draws the sample grids).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How to run, not what to train (not part of the config).

    device: 'cpu', 'cuda' or 'cuda:N' (default: cuda:LOCAL_RANK when GPUs are present, else the CPU).
    compile: torch.compile the score UNet. channels_last: that memory format for the model and batches.
    fused_adamw: torch's fused AdamW (None: where torch has it, CPU and CUDA).
    """

    device: str | None = None
    compile: bool = False
    channels_last: bool = False
    fused_adamw: bool | None = None


# ------------------------------------------------------------------------------------------- processes

def torchrun_environment() -> bool:
    """True when started by torchrun (or anything that sets its RANK / WORLD_SIZE / MASTER_ADDR variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: None -> cuda when GPUs are present, else the CPU; 'cuda' without an index
    -> cuda:LOCAL_RANK (torchrun's local rank, so that the processes of a node take one GPU each)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
        dist.init_process_group(backend, store=_attempt_store(), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=PROCESS_GROUP_TIMEOUT)


def _attempt_store() -> dist.Store:
    """torchrun's key-value store, its keys scoped to this attempt (TORCHELASTIC_RESTART_COUNT).

    torchrun's agent keeps one TCPStore across the restarts of a job and its workers write unscoped keys:
    after a restart the gloo addresses of the dead attempt were still there, and a worker that read one
    before its peer had written the new one connected to a dead port (connection refused)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_it and rank == 0, timeout=PROCESS_GROUP_TIMEOUT)
    return dist.PrefixStore(f"vdm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def _all_reduce(values: torch.Tensor, op, device: torch.device) -> torch.Tensor:
    """`values` reduced over the processes with `op` (a collective: all must call it)."""
    if process_count() == 1:
        return values
    values = values.to(_comm_device(device))
    dist.all_reduce(values, op=op)
    return values


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


def to_device(images: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Images or noise (B, H, W, C) numpy -> (B, C, H, W) tensor on `device`, in NCHW or channels_last memory."""
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


def with_config(model: vdm.VDM, model_config: ModelConfig) -> vdm.VDM:
    """`model` itself, or a VDM of another `model_config` with the same weights (another bound to evaluate:
    run.eval_bound changes only the diffusion term's timesteps)."""
    if model_config == model.config:
        return model
    with torch.random.fork_rng(devices=[]):      # the throw-away init must not move the caller's RNG
        other = vdm.VDM(model_config)
    other = other.to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict(), strict=True)
    return other.requires_grad_(False)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class TCPStoreKeys:
    """torch's process-group store as a vdm_common.watchdog.KeyValueStore."""

    def __init__(self, store):
        self.store = store

    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None


# ------------------------------------------------------------------------------------------------ engine

class Engine:
    """vdm_common.engine.Engine over torch: one process per device (see the module docstring)."""

    name = BACKEND

    def __init__(self, options: EngineOptions = EngineOptions()):
        self.options = options
        self.device = resolve_device(options.device)
        self.compiles = options.compile
        self._checkpointer: Checkpointer | None = None
        self._forward = None
        self._config = None

    # -- processes and devices
    def process_index(self) -> int:
        return process_index()

    def process_count(self) -> int:
        return process_count()

    def device_count(self) -> int:
        return process_count()            # one device per process

    def all_ok(self, ok: bool) -> bool:
        return bool(_all_reduce(torch.tensor([int(ok)], device=self.device), dist.ReduceOp.MIN, self.device).item())

    def max_over_processes(self, value: int) -> int:
        return int(_all_reduce(torch.tensor([int(value)], device=self.device), dist.ReduceOp.MAX, self.device).item())

    def peer_store(self):
        if process_count() == 1:
            return None
        # A connection of its own to the process group's TCPStore (torchrun's agent, or process 0), with a short
        # timeout: an unanswered request must not hold the watch for the store's default 5 minutes.
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(datetime.timedelta(seconds=5))
        return TCPStoreKeys(store)

    def _fused(self, model_config: ModelConfig) -> bool:
        fused = self.options.fused_adamw
        return fused_available(self.device, model_config) if fused is None else fused

    # -- training
    def init_or_restore(self, config, workdir, image_shape, say):
        mc, opt, t = config_lib.model_config(config), config.optimizer, config.training
        fused = self._fused(mc)
        self._config = config
        self._checkpointer = Checkpointer(workdir, mc, t.checkpoints_to_keep, read_only=process_index() != 0)
        restored = self._checkpointer.restore_latest(opt, self.device, fused, restore_rng=True, say=say)
        if restored is None:
            state = steps.create_train_state(mc, opt, stream_seed(t.seed, _STREAM_INIT, 0), self.device, fused)
        else:
            state, _ = restored
        if self.options.channels_last:
            to_channels_last(state)
        self._forward = make_forward(state.model, self.device, self.options.compile)
        return state, None if restored is None else restored[1]

    def train_steps(self, state, first_step, images, conditioning):
        """Steps first_step..: the metrics (means over the applied steps, averaged over the processes;
        `skipped` summed) reach the host once per call, as the JAX engine's."""
        mc, opt, t = config_lib.model_config(self._config), self._config.optimizer, self._config.training
        shard, sums, skipped = (process_index(), process_count()), None, []
        for offset in range(len(images)):
            s = first_step + offset
            steps.seed_dropout(t.seed, s, shard[0])
            metrics = steps.train_step(
                mc, opt, state, to_device(images[offset], self.device, self.options.channels_last),
                torch.from_numpy(conditioning[offset]).to(self.device),
                generator=steps.step_generator(t.seed, s, self.device), forward=self._forward, shard=shard)
            skipped.append(float(metrics["skipped"]))       # the step itself already read it on the host
            if skipped[-1]:
                continue
            values = torch.stack([metrics[name].to(device=self.device, dtype=torch.float64) for name in TRAIN_METRICS])
            sums = values if sums is None else sums + values
        applied = len(images) - sum(skipped)
        means = (_all_reduce(sums / applied, dist.ReduceOp.SUM, self.device) / process_count()).tolist() if applied \
            else [float("nan")] * len(TRAIN_METRICS)
        return state, dict(zip(TRAIN_METRICS, means), skipped=float(sum(skipped)), skipped_per_step=skipped)

    def fetch_metrics(self, pending):
        return pending

    def step_of(self, state) -> int:
        return state.step

    def count_params(self, state) -> int:
        return count_params(state.model)

    def weights(self, state, which="ema"):
        return state.ema if which == "ema" else state.model

    def save(self, step, state):
        # Process 0 writes (synchronously, atomically); the others learn whether it succeeded.
        on_main_process(self, lambda: self._checkpointer.save(step, state), f"save checkpoint step {step}")

    def wait(self):
        """Nothing to wait for: saves are synchronous."""

    def close(self):
        self._checkpointer = None

    def profiler(self, directory, steps_, say):
        return Profiler(Path(directory), steps_, self.device, process_index(), say)

    def describe_memory(self):
        if self.device.type == "cuda" and process_index() == 0:
            return f"peak GPU memory of process 0: {metrics_lib.format_bytes(torch.cuda.max_memory_allocated(self.device))}"
        return None

    # -- evaluation and sampling
    def restore_weights(self, workdir, config, which, step, say):
        """The weights of a checkpoint of this backend (torch file) or of the other (its neutral export):
        the weights are converted on the fly."""
        mc = config_lib.model_config(config)
        reader = Checkpointer(workdir, mc, config.training.checkpoints_to_keep, read_only=True)
        restored = reader.restore_latest(config.optimizer, self.device, fresh_optimizer=True, say=say, step=step)
        if restored is None:
            raise run.no_checkpoint(workdir, step, reader.torch_steps() + run.neutral_steps(workdir))
        state, found = restored
        return self._prepared(self.weights(state, which)), found

    def weights_from_neutral(self, checkpoint, which):
        flat = checkpoint.ema_params if which == "ema" and checkpoint.ema_params is not None else checkpoint.params
        return self._prepared(convert.model_from_neutral(flat, checkpoint.model_config, which).to(self.device))

    def _prepared(self, model: vdm.VDM) -> vdm.VDM:
        model.requires_grad_(False)
        return model.to(memory_format=torch.channels_last) if self.options.channels_last else model

    def eval_terms(self, model_config, weights, images, conditioning, noise):
        rank, count = process_index(), process_count()
        rows = slice(rank * len(images) // count, (rank + 1) * len(images) // count)   # this process's rows
        dtype, cl = vdm.float_dtype(model_config), self.options.channels_last
        local = Noise(t=torch.as_tensor(noise.t[rows], dtype=dtype, device=self.device),
                      eps=to_device(noise.eps[rows], self.device, cl).to(dtype),
                      eps_0=to_device(noise.eps_0[rows], self.device, cl).to(dtype))
        terms = steps.eval_terms(with_config(weights, model_config), to_device(images[rows], self.device, cl),
                                 torch.from_numpy(conditioning[rows]).to(self.device), local)
        stacked = torch.stack([terms[name] for name in run.EVAL_TERMS], dim=1).double()      # (B_local, 4)
        gathered = _all_gather_rows(stacked, self.device).cpu().numpy()                       # (B, 4)
        return {name: gathered[:, i] for i, name in enumerate(run.EVAL_TERMS)}

    @torch.no_grad()
    def sample(self, model_config, weights, z_1, steps_, step_noise, gumbel):
        model, dtype = with_config(weights, model_config), vdm.float_dtype(model_config)
        cl = self.options.channels_last
        z = to_device(z_1, self.device, cl).to(dtype)
        conditioning = torch.zeros(len(z_1), device=self.device, dtype=dtype)
        for i in range(steps_):
            z = model.sample_step(z, i, steps_, conditioning, to_device(step_noise(), self.device, cl).to(dtype))
        if gumbel is not None:     # (N, H, W, C, V) -> (N, C, H, W, V)
            gumbel = torch.from_numpy(np.ascontiguousarray(gumbel.transpose(0, 3, 1, 2, 4))).to(self.device, dtype)
        return model.generate_x(z, gumbel=gumbel).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------------ profile

class Profiler:
    """--profile: a torch.profiler trace of about `steps` training steps into <workdir>/profile/:
    trace_rank<R>.json (chrome://tracing or Perfetto) and summary_rank<R>.txt (the operators by time).
    Tracing starts after the first call (with --compile, the one that compiles) and covers whole calls
    (training.substeps steps each)."""

    def __init__(self, directory: Path, steps: int, device: torch.device, rank: int, say: Callable[[str], None]):
        self.directory, self.steps, self.rank, self.say, self.first = directory, steps, rank, say, None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self._profile = torch.profiler.profile(activities=activities)
        self.tracing = False

    def after(self, step: int, state=None) -> None:
        """Called after each training call with the step reached."""
        if self.first is None:
            self._profile.start()
            self.first, self.tracing = step, True
        elif self.tracing and step - self.first >= self.steps:
            self.close()
            self.directory.mkdir(exist_ok=True)
            self._profile.export_chrome_trace(str(self.directory / f"trace_rank{self.rank}.json"))
            table = self._profile.key_averages().table(sort_by=self.sort_by, row_limit=30)
            (self.directory / f"summary_rank{self.rank}.txt").write_text(table + "\n")
            self.say(f"profile of steps {self.first}..{step}: {self.directory}")

    def close(self) -> None:
        if self.tracing:
            self._profile.stop()
            self.tracing = False
