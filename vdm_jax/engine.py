"""The JAX engine: the framework work of training, eval and sampling (vdm_common.engine), over a device mesh.

Parallelism is the pjit way: one `Mesh` of every device of every process with the single axis 'data';
the TrainState is replicated (`NamedSharding(mesh, P())`), the global batch is split along its batch axis
(`P(None, 'data')` for the (S, B, H, W, C) substep stack), and `jax.jit` with those shardings compiles the
global computation, inserting the gradient all-reduce. The state buffers are donated, and each host call
runs `training.substeps` optimizer steps (`vdm_jax.steps.train_substeps`, a lax.scan, as the official code).
Each process passes only its rows of the global batch; `jax.make_array_from_process_local_data` assembles
the global array. Multi-host: one process per host with --coordinator_address/--num_processes/--process_id
(or --multihost on SLURM, Open MPI, TPU pods): `initialize_distributed` runs first, then `jax.devices()`
lists every host's devices.

Randomness: the run key `jax.random.key(training.seed)` is split into streams (init, training). A training
step folds its step number into its stream and draws the loss noise and the dropout masks for the GLOBAL
batch inside the jitted step: the partitionable threefry PRNG gives every device the values of its own rows,
so the numbers do not depend on the device count. Eval and sampling noise comes in from the host
(vdm_common.noise). Every number is the same on 1 or N devices up to float32 reassociation of the batch
reductions, and a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import functools
import gzip
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

import filelock
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdm_common import config as config_lib
from vdm_common import run
from vdm_common.config import ModelConfig
from vdm_common.types import Noise
from vdm_jax import convert, steps, vdm
from vdm_jax.checkpoint import Checkpointer, to_host
from vdm_jax.unet import dtypes

BACKEND = "jax"
MESH_AXIS = "data"
COMPILATION_CACHE_MAX_BYTES = 4 * 2**30      # the least recently used programs are evicted beyond this
# Streams of the run key, one per use (so that, e.g., more eval batches never change training).
_STREAM_INIT, _STREAM_TRAIN = range(2)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How to run, not what to train (not part of the config).

    devices: the mesh's devices (default: every device of every process).
    compilation_cache: the directory of the persistent compilation cache; None: default_compilation_cache();
    '' turns it off.
    """

    devices: tuple | None = None
    compilation_cache: str | None = None


# ------------------------------------------------------------------------------------ compilation cache

def default_compilation_cache() -> str:
    """$JAX_COMPILATION_CACHE_DIR when set, else the per-user $XDG_CACHE_HOME/vdm/jax (~/.cache/vdm/jax)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vdm", "jax")


def use_compilation_cache(directory: str | None) -> None:
    """Keeps XLA's compiled programs in `directory` (None: default_compilation_cache(); '': not at all), so
    that a later run, eval or sample of the same config, code and devices loads them instead of compiling
    them. JAX reads this once, at the first compile of the process, and writes only programs that took over a
    second to compile (jax_persistent_cache_min_compile_time_secs)."""
    directory = default_compilation_cache() if directory is None else directory
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise run.RunError(f"--compilation_cache={directory}: cannot create the directory ({e.strerror}); "
                           f"name a writable one, or --compilation_cache= to run without the cache") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if directory != os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # This library's own directory: bounded. $JAX_COMPILATION_CACHE_DIR is the user's cache for all of JAX,
        # written by programs without a bound; its size is left to JAX's settings (JAX_COMPILATION_CACHE_MAX_SIZE).
        remove_entries_without_access_time(directory)
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


def remove_entries_without_access_time(directory: str) -> None:
    """JAX's size-bounded cache keeps `<key>-atime` beside every `<key>-cache` and fails every later write
    (one warning per program) when one is missing: after a process killed while writing an entry (which may
    be cut short too), or a JAX program that wrote without a bound. Such entries are removed, under JAX's
    own lock of the directory so that an entry being written now is not taken for one."""
    try:
        with filelock.FileLock(os.path.join(directory, ".lockfile"), timeout=10):
            for entry in Path(directory).glob("*-cache"):
                if not entry.with_name(entry.name.removesuffix("-cache") + "-atime").exists():
                    entry.unlink(missing_ok=True)
    except filelock.Timeout:       # another process holds it for long: leave the directory as it is
        pass


# ------------------------------------------------------------------------------------------- devices

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, peer_timeout: float = 20.0) -> None:
    """jax.distributed.initialize: explicit arguments, or none to let JAX detect the cluster (SLURM, Open MPI,
    TPU pods). Must run before anything touches a device. On CPU the collectives go through gloo.

    The coordination service's heartbeat timeout (after which it aborts every process with a fatal error) is
    set well beyond `peer_timeout`, the watch that stops the job cleanly first (vdm_common.watchdog)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=int(max(100, 3 * peer_timeout)))


class CoordinationStore:
    """The key-value store of JAX's coordination service (vdm_common.watchdog.KeyValueStore). JAX exposes
    it only as `jax._src.distributed.global_state.client`, the client jax.distributed.initialize made."""

    def __init__(self, client):
        self.client = client

    def set(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value, allow_overwrite=True)

    def get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:  # NOT_FOUND comes as a plain exception; anything else means the store is gone
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over `devices` (default: all devices of all processes), ordered by process so
    that each process's devices hold one contiguous slice of the batch (its `train_batch` slice)."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (MESH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Split along `batch_axis` over the mesh, replicated along the others."""
    return NamedSharding(mesh, P(*([None] * batch_axis), MESH_AXIS))


def global_array(mesh: Mesh, local: np.ndarray, batch_axis: int) -> jax.Array:
    """This process's rows of a global batch -> the global jax.Array, split along `batch_axis`."""
    global_shape = list(local.shape)
    global_shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axis), local, tuple(global_shape))


def split_array(mesh: Mesh, whole: np.ndarray) -> jax.Array:
    """A global batch that every process holds whole -> the jax.Array split along its first axis."""
    return jax.make_array_from_callback(whole.shape, batch_sharding(mesh, 0), lambda index: whole[index])


# --------------------------------------------------------------------------------------- step functions

def abstract_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, image_shape,
                         mesh: Mesh) -> steps.TrainState:
    """The TrainState's shapes and dtypes (nothing computed), each leaf carrying the replicated sharding."""
    shapes = jax.eval_shape(functools.partial(steps.create_train_state, model_config, opt,
                                              image_shape=tuple(image_shape)), jax.random.key(0))
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def init_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, image_shape, mesh: Mesh,
                     rng: jax.Array) -> steps.TrainState:
    """A fresh TrainState created directly on the devices of the mesh (replicated)."""
    init = functools.partial(steps.create_train_state, model_config, opt, image_shape=tuple(image_shape))
    return jax.jit(init, out_shardings=replicated(mesh))(rng)


def make_train_fn(model_config: ModelConfig, opt: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """(state, images (S, B, H, W, C), conditioning (S, B), rng) -> (state, metrics averaged over S steps).

    Jitted over the mesh: state replicated and donated, the batch split along B, the metrics replicated.
    The same arguments give the same jitted function (so a second run in one process compiles nothing).
    """
    return _train_fn(model_config, opt.to_json(sort_keys=True), mesh)


@functools.lru_cache(maxsize=8)
def _train_fn(model_config: ModelConfig, opt_json: str, mesh: Mesh) -> Callable:
    opt = ml_collections.ConfigDict(json.loads(opt_json))
    rep, split = replicated(mesh), batch_sharding(mesh, 1)
    return jax.jit(functools.partial(steps.train_substeps, model_config, opt),
                   in_shardings=(rep, split, split, rep), out_shardings=(rep, rep), donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def make_eval_fn(model_config: ModelConfig, mesh: Mesh) -> Callable:
    """(params, images (B, ...), conditioning (B,), noise) -> per-example bpd terms (`steps.eval_terms`),
    the batch split over the mesh, the outputs replicated (every process holds every row)."""
    rep, split = replicated(mesh), batch_sharding(mesh, 0)
    return jax.jit(functools.partial(steps.eval_terms, model_config), in_shardings=(rep, split, split, split),
                   out_shardings=rep)


@functools.lru_cache(maxsize=8)
def make_sample_fns(model_config: ModelConfig, steps_: int) -> tuple[Callable, Callable]:
    """(step(params, z_t, i, conditioning, eps) -> z_s, decode(params, z_0, gumbel) -> images): one
    ancestral step of `steps_` and the decoder, jitted for this process's devices (no collectives)."""
    model = vdm.VDM(model_config)

    def step(params, z_t, i, conditioning, eps):
        return model.apply({"params": params}, z_t, i, steps_, conditioning, eps, method=vdm.VDM.sample_step)

    def decode(params, z_0, gumbel):
        return model.apply({"params": params}, z_0, gumbel=gumbel, method=vdm.VDM.generate_x)
    return jax.jit(step), jax.jit(decode)


def run_key(seed: int, stream: int, mesh: Mesh) -> jax.Array:
    """The key of one stream of the run, as a replicated global array (an input every process shares)."""
    return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), stream), out_shardings=replicated(mesh))()


def count_params(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def use_float64(model_config: ModelConfig) -> None:
    """Turns on jax_enable_x64 for a float64 model (before its arrays are made)."""
    if model_config.compute_dtype == "float64":
        jax.config.update("jax_enable_x64", True)


# ------------------------------------------------------------------------------------------------ engine

class Engine:
    """vdm_common.engine.Engine over a JAX device mesh (see the module docstring)."""

    name = BACKEND
    compiles = True

    def __init__(self, options: EngineOptions = EngineOptions()):
        self.options = options
        use_compilation_cache(options.compilation_cache)
        self.mesh = make_mesh(options.devices)
        if jax.process_count() > 1:
            # When process 0 dies, JAX aborts the others (see vdm_common.watchdog); absl's faulthandler would
            # add a dump of every thread and loaded module to JAX's one fatal line.
            faulthandler.disable()
        self._checkpointer: Checkpointer | None = None
        self._train_fn = self._train_rng = None

    # -- processes and devices
    def process_index(self) -> int:
        return jax.process_index()

    def process_count(self) -> int:
        return jax.process_count()

    def device_count(self) -> int:
        return self.mesh.size

    def all_ok(self, ok: bool) -> bool:
        if jax.process_count() == 1:
            return ok
        return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))

    def max_over_processes(self, value: int) -> int:
        if jax.process_count() == 1:
            return int(value)
        return int(np.max(multihost_utils.process_allgather(np.int32(value))))

    def peer_store(self):
        from jax._src import distributed
        client = distributed.global_state.client
        return CoordinationStore(client) if jax.process_count() > 1 and client is not None else None

    # -- training
    def init_or_restore(self, config, workdir, image_shape, say):
        mc, opt, t = config_lib.model_config(config), config.optimizer, config.training
        use_float64(mc)
        self._checkpointer = Checkpointer(workdir, mc, t.checkpoints_to_keep)
        restored = self._checkpointer.restore_latest(self._abstract_state(config), opt, say=say)
        self._train_fn = make_train_fn(mc, opt, self.mesh)
        self._train_rng = run_key(t.seed, _STREAM_TRAIN, self.mesh)
        if restored is not None:
            return restored
        return init_train_state(mc, opt, image_shape, self.mesh, run_key(t.seed, _STREAM_INIT, self.mesh)), None

    def _abstract_state(self, config) -> steps.TrainState:
        """The shapes of a checkpoint's state (the parameters' do not depend on the images' height and width)."""
        mc = config_lib.model_config(config)
        return abstract_train_state(mc, config.optimizer, (1, 1, mc.image_channels), self.mesh)

    def train_steps(self, state, first_step, images, conditioning):
        return self._train_fn(state, global_array(self.mesh, images, 1), global_array(self.mesh, conditioning, 1),
                              self._train_rng)

    def fetch_metrics(self, pending):
        return to_host(pending)

    def step_of(self, state) -> int:
        return int(to_host(state.step))

    def count_params(self, state) -> int:
        return count_params(state.params)

    def weights(self, state, which="ema"):
        return state.ema_params if which == "ema" else state.params

    def save(self, step, state):
        self._checkpointer.save(step, state)

    def wait(self):
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def close(self):
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            checkpointer.close()

    def profiler(self, directory, steps, say):
        return Profiler(Path(directory), steps, say)

    def describe_memory(self):
        return None

    # -- evaluation and sampling
    def restore_weights(self, workdir, config, which, step, say):
        mc = config_lib.model_config(config)
        use_float64(mc)
        reader = Checkpointer(workdir, mc, config.training.checkpoints_to_keep, read_only=True)
        try:
            restored = reader.restore_latest(self._abstract_state(config), config.optimizer, fresh_optimizer=True,
                                             say=say, step=step)
            present = reader.orbax_steps() + run.neutral_steps(workdir)
        finally:
            reader.close()
        if restored is None:
            raise run.no_checkpoint(workdir, step, present)
        state, found = restored
        return self.weights(state, which), found

    def weights_from_neutral(self, checkpoint, which):
        use_float64(checkpoint.model_config)
        flat = checkpoint.ema_params if which == "ema" and checkpoint.ema_params is not None else checkpoint.params
        params = convert.params_from_neutral(flat, checkpoint.model_config, which)
        return jax.device_put(params, replicated(self.mesh))

    def eval_terms(self, model_config, weights, images, conditioning, noise):
        dtype = dtypes(model_config)[0]
        noise = Noise(*(split_array(self.mesh, np.asarray(x, dtype)) for x in noise))
        terms = make_eval_fn(model_config, self.mesh)(weights, split_array(self.mesh, images),
                                                      split_array(self.mesh, conditioning), noise)
        return {name: np.asarray(values, np.float64) for name, values in to_host(terms).items()}

    def sample(self, model_config, weights, z_1, steps_, step_noise, gumbel):
        dtype = dtypes(model_config)[0]
        step, decode = make_sample_fns(model_config, steps_)
        params = jax.device_put(to_host(weights), jax.local_devices()[0])     # this process alone
        conditioning = jnp.zeros((len(z_1),), dtype)
        z = jnp.asarray(z_1, dtype)
        for i in range(steps_):
            z = step(params, z, i, conditioning, jnp.asarray(step_noise(), dtype))
        return np.asarray(decode(params, z, None if gumbel is None else jnp.asarray(gumbel, dtype)))


# ------------------------------------------------------------------------------------------------ profile

class Profiler:
    """--profile: a jax.profiler trace of about `steps` training steps into <workdir>/profile/ (TensorBoard's
    profile plugin or Perfetto read it: plugins/profile/<time>/<host>.xplane.pb and .trace.json.gz), and
    summary_rank<P>.txt: the compiled program's operations (XLA fusions, by kind) by time, as the torch
    engine's summary lists its operators. Tracing starts after the first call, which compiles, and covers
    whole calls (training.substeps steps each)."""

    def __init__(self, directory: Path, steps: int, say: Callable[[str], None]):
        self.directory, self.steps, self.say = directory, steps, say
        self.first, self.tracing = None, False

    def after(self, step: int, state) -> None:
        """Called after each training call with the step reached and the (possibly still running) state."""
        if self.first is None:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.directory))
            self.first, self.tracing = step, True
        elif self.tracing and step - self.first >= self.steps:
            jax.block_until_ready(state)
            self.close()
            traces = sorted(self.directory.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
            if traces:
                summary = self.directory / f"summary_rank{jax.process_index()}.txt"
                summary.write_text(trace_summary(traces[-1]))
            self.say(f"profile of steps {self.first}..{step}: {self.directory}")

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def trace_summary(path, rows: int = 30) -> str:
    """A table of a jax.profiler trace's device operations grouped by kind ('convolution.12' and
    'convolution.40' are one row): total ms, share of the operations' time, count. Python frames ('$...')
    and the runtime's wrappers are left out: what remains is the time inside the compiled program."""
    events = json.loads(gzip.decompress(Path(path).read_bytes()))["traceEvents"]
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "PjitFunction")):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        totals[kind] = totals.get(kind, 0.0) + event.get("dur", 0) / 1e3
        counts[kind] = counts.get(kind, 0) + 1
    whole = sum(totals.values()) or 1.0
    lines = [f"{'operation (kind)':40s} {'total ms':>10s} {'share':>7s} {'count':>7s}"]
    for kind, ms in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{kind[:40]:40s} {ms:10.1f} {100 * ms / whole:6.1f}% {counts[kind]:7d}")
    lines.append(f"{'all operations':40s} {whole:10.1f}")
    return "\n".join(lines) + "\n"
