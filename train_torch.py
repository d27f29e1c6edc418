"""Train, evaluate, sample from or plot a VDM with the PyTorch backend.

    python train_torch.py                                  # the quickstart (digits) into runs/quickstart_torch
    python train_torch.py --config=configs/cifar10.py      # into runs/cifar10_torch
    python train_torch.py --config=configs/cifar10.py --config.training.batch_size_train=64 --workdir=runs/c10
    python train_torch.py --workdir=runs/quickstart_torch --mode=eval   # test bpd of the EMA params + baseline
    python train_torch.py --workdir=runs/quickstart_torch --mode=sample --config.training.num_samples=16
    python train_torch.py --workdir=runs/quickstart_torch --mode=plot   # plots/bpd.png from metrics.jsonl
    python train_torch.py --workdir=runs/quickstart_jax --mode=eval     # a JAX run, converted on the fly

A training run resumes from the latest checkpoint of its workdir (its own, or the neutral export of a JAX run),
and refuses a workdir made with a different config. Eval and sample modes use the config stored in the
workdir (either backend's).

Data parallelism: one process per device, started by torchrun (DistributedDataParallel; nccl on GPUs, gloo
on CPUs); training.batch_size_train is the GLOBAL batch, split evenly over the processes:
    torchrun --nproc_per_node=8 train_torch.py --config=configs/cifar10.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train_torch.py ...
or, as with train_jax.py, --coordinator_address=HOST0:PORT --num_processes=N --process_id=I per process.

Speed options (the function trained is the same): --compile (torch.compile), --channels_last, --fused_adamw
(default on), and --config.model.compute_dtype=bfloat16 (bf16 autocast; a model field, part of the config).
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
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory; default runs/<config name>_torch.")
_MODE = flags.DEFINE_enum("mode", "train", run.MODES, "train, eval, sample or plot.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join the process group from torchrun's environment (implied "
                                                   "when torchrun started this process).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                                                                "without torchrun).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
# Torch-only options: how to run, not what to train (they are not part of the config).
_DEVICE = flags.DEFINE_string("device", None, "cpu, cuda or cuda:N; default cuda:LOCAL_RANK when GPUs are "
                                              "present, else cpu.")
_COMPILE = flags.DEFINE_bool("compile", False, "torch.compile the training forward pass.")
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", False, "channels_last memory format for the model and batches.")
_FUSED = flags.DEFINE_bool("fused_adamw", True, "Fused AdamW where torch has it (CPU and CUDA).")
_PROFILE = flags.DEFINE_bool("profile", False, "Write a profiler trace of --profile_steps training steps (after the "
                                               "first call, which compiles) into <workdir>/profile/.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 20, "Steps the --profile trace covers (whole calls of "
                                                           "training.substeps steps).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --flags (see --help)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or run.default_workdir(config_path, "torch")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])

    from vdm_common import data, neutral, weights, workdir as workdir_lib
    from vdm_torch import checkpoint, train

    user_errors = (config_lib.ConfigError, data.DataError, workdir_lib.WorkdirError, run.RunError,
                   checkpoint.CheckpointError, neutral.NeutralFileError, weights.ConversionError, FileNotFoundError)
    try:
        if _MULTIHOST.value or _COORDINATOR.value or train.torchrun_environment():
            train.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DEVICE.value)
        config = run.entry_config(_MODE.value, workdir, _CONFIG.value, flags.FLAGS["config"].present > 0,
                                  overrides)
        summary = train.main(config, workdir, _MODE.value, overrides, device=_DEVICE.value, compile=_COMPILE.value,
                             channels_last=_CHANNELS_LAST.value, fused=None if _FUSED.value else False,
                             profile_steps=_PROFILE_STEPS.value if _PROFILE.value else 0)
    except user_errors as e:
        index, count = train.process_index(), train.process_count()
        print(f"error (process {index} of {count}): {e}" if index else f"error: {e}", file=sys.stderr)
        return 1
    finally:
        train.shutdown_distributed()
    return interrupts.exit_status(summary.get("interrupted"))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
