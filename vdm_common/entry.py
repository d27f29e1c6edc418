"""What train_jax.py and train_torch.py share: their common flags and their main, written once.

An entry script defines its backend's own flags, then calls `run(argv, backend, join, make_engine, leave)`:
the config (file + --config.x=y overrides, or the workdir's stored one), the process group (`join`), the
engine, vdm_common.trainer.main, and one `error: ...` line with exit status 1 for every user error
(vdm_common.errors.UserError); a run stopped by a signal exits with 128 + its number.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

from vdm_common import bitsback, interrupts, run as run_lib, trainer, watchdog
from vdm_common import workdir as workdir_lib
from vdm_common.engine import Engine
from vdm_common.errors import UserError

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags(backend: str, multihost_help: str, coordinator_help: str) -> None:
    """The flags both entry scripts take (their own come beside them)."""
    config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "quickstart.py"),
                                    "A config file (configs/*.py); --config.section.field=value overrides.")
    flags.DEFINE_string("workdir", None, f"The run directory; default runs/<config name>_{backend}.")
    flags.DEFINE_enum("mode", "train", trainer.MODES, "train, eval, sample, plot, compress or decompress.")
    flags.DEFINE_string("input", None, "--mode=compress: a .npz of uint8 images (array 'images', N x H x W x C) or "
                                       "a folder of PNGs; --mode=decompress: a file written by --mode=compress.")
    flags.DEFINE_string("output", None, "--mode=compress: the compressed file to write; --mode=decompress: a .npz "
                                        "or a folder of PNGs to write. Never replaces anything that exists.")
    flags.DEFINE_integer("timesteps", None, f"--mode=compress: steps T of the discrete-time model the images are "
                                            f"coded with (default {bitsback.DEFAULT_TIMESTEPS}); --mode=decompress: "
                                            f"the T the file must have (default: the file's).", lower_bound=1)
    flags.DEFINE_bool("multihost", False, multihost_help)
    flags.DEFINE_string("coordinator_address", None, coordinator_help)
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.DEFINE_bool("profile", False, "Write a profiler trace of --profile_steps training steps (after the "
                                        "first call, which compiles) into <workdir>/profile/.")
    flags.DEFINE_integer("profile_steps", 20, "Steps the --profile trace covers (whole calls of "
                                              "training.substeps steps).")
    flags.DEFINE_float("peer_timeout", 20.0, "Multi-process runs: seconds without a heartbeat of another process "
                                             "(killed, lost, stopped) before every process stops, with exit status "
                                             f"{watchdog.EXIT_PEER_LOST} (vdm_common/watchdog.py).", lower_bound=2.0)


def run(argv: list[str], backend: str, join: Callable[[], None], make_engine: Callable[[], Engine],
        leave: Callable[[], None] = lambda: None) -> int:
    """The entry scripts' main: returns the exit status. join() joins the process group where the flags or
    the environment ask for one; make_engine() builds the engine; leave() leaves the process group."""
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --flags (see --help)")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)     # orbax logs every save at INFO and read-only use at WARNING
    config_path = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or trainer.default_workdir(config_path, backend)
    overrides = config_flags.get_override_values(FLAGS["config"])
    engine = None
    with contextlib.ExitStack() as stack:
        stack.callback(leave)              # last: after the peer watch has told the others this one is done
        try:
            join()
            engine = make_engine()
            watch = _watch_peers(engine, workdir, stack)
            config = trainer.entry_config(FLAGS.mode, workdir, FLAGS.config, FLAGS["config"].present > 0, overrides)
            try:
                coding = trainer.Coding(FLAGS.input, FLAGS.output, FLAGS.timesteps)
                summary = trainer.main(engine, config, workdir, FLAGS.mode, overrides,
                                       profile_steps=FLAGS.profile_steps if FLAGS.profile else 0, coding=coding)
            except Exception as e:
                if watch is not None and not isinstance(e, UserError):
                    watch.settle()           # a collective failed because a peer is gone: the watch ends us
                raise
        except UserError as e:
            index, count = (engine.process_index(), engine.process_count()) if engine is not None else (0, 1)
            print(f"error (process {index} of {count}): {e}" if index else f"error: {e}", file=sys.stderr)
            return 1
    return interrupts.exit_status(summary.get("interrupted"))


def _watch_peers(engine: Engine, workdir: str, stack: contextlib.ExitStack) -> watchdog.PeerWatch | None:
    """In a multi-process run, the watch that stops every process when one stops responding."""
    store = engine.peer_store()
    if store is None:
        return None

    def newest() -> str:
        steps = run_lib.neutral_steps(workdir)
        return f"step {steps[-1]} ({workdir_lib.layout(workdir).checkpoints})" if steps else "none yet"
    return stack.enter_context(watchdog.PeerWatch(store, engine.process_index(), engine.process_count(),
                                                  FLAGS.peer_timeout, newest))
