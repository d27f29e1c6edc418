"""Train, evaluate, sample from or plot a VDM with the JAX backend.

    python train_jax.py                                    # the quickstart (digits) into runs/quickstart_jax
    python train_jax.py --config=configs/cifar10.py        # into runs/cifar10_jax
    python train_jax.py --config=configs/cifar10.py --config.training.batch_size_train=64 --workdir=runs/c10
    python train_jax.py --workdir=runs/quickstart_jax --mode=eval     # test bpd of the EMA params + baseline
    python train_jax.py --workdir=runs/quickstart_jax --mode=sample --config.training.num_samples=16
    python train_jax.py --workdir=runs/quickstart_jax --mode=plot     # plots/bpd.png from metrics.jsonl

A training run resumes from the latest checkpoint of its workdir, and refuses a workdir made with a different
config. Eval and sample modes use the config stored in the workdir (either backend's).

Multi-host: start one process per host with the same flags plus
    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
or --multihost alone where JAX detects the cluster (SLURM, Open MPI, Cloud TPU).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_common import cli
from vdm_common import config as config_lib
from vdm_common import interrupts
from vdm_common import run

_HERE = os.path.dirname(os.path.abspath(__file__))
cli.check_config_overrides(sys.argv)          # before the config flag reads them
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "quickstart.py"),
                                          "A config file (configs/*.py); --config.section.field=value overrides.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory; default runs/<config name>_jax.")
_MODE = flags.DEFINE_enum("mode", "train", run.MODES, "train, eval, sample or plot.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (cluster auto-detection).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
_PROFILE = flags.DEFINE_bool("profile", False, "Write a profiler trace of --profile_steps training steps (after the "
                                               "first call, which compiles) into <workdir>/profile/.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 20, "Steps the --profile trace covers (whole calls of "
                                                           "training.substeps steps).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --flags (see --help)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)     # orbax logs every save at INFO and read-only use at WARNING
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or run.default_workdir(config_path, "jax")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])

    from vdm_common import data, neutral, weights, workdir as workdir_lib
    from vdm_jax import checkpoint, train

    user_errors = (config_lib.ConfigError, data.DataError, workdir_lib.WorkdirError, run.RunError,
                   checkpoint.CheckpointError, neutral.NeutralFileError, weights.ConversionError, FileNotFoundError)
    try:
        if _MULTIHOST.value or _COORDINATOR.value:
            train.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        config = run.entry_config(_MODE.value, workdir, _CONFIG.value, flags.FLAGS["config"].present > 0,
                                  overrides)
        summary = train.main(config, workdir, _MODE.value, overrides,
                             profile_steps=_PROFILE_STEPS.value if _PROFILE.value else 0)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return interrupts.exit_status(summary.get("interrupted"))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
