"""Train, evaluate, sample from or plot a VDM with the JAX backend.

    python train_jax.py                                    # the quickstart (digits) into runs/quickstart_jax
    python train_jax.py --config=configs/cifar10.py        # into runs/cifar10_jax
    python train_jax.py --config=configs/cifar10.py --config.training.batch_size_train=64 --workdir=runs/c10
    python train_jax.py --workdir=runs/quickstart_jax --mode=eval     # test bpd of the EMA params + baseline
    python train_jax.py --workdir=runs/quickstart_jax --mode=sample --config.training.num_samples=16
    python train_jax.py --workdir=runs/quickstart_jax --mode=plot     # plots/bpd.png from metrics.jsonl
    python train_jax.py --workdir=runs/quickstart_jax --mode=compress --input=digits.npz --output=digits.vdmz
    python train_jax.py --workdir=runs/quickstart_jax --mode=decompress --input=digits.vdmz --output=pngs/

A training run resumes from the latest checkpoint of its workdir, and refuses a workdir made with a different
config. Eval, sample, compress and decompress modes use the config stored in the workdir (either backend's);
compress codes images losslessly with bits-back coding (README "Lossless compression").

Multi-host: start one process per host with the same flags plus
    --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
or --multihost alone where JAX detects the cluster (SLURM, Open MPI, Cloud TPU).
"""
import sys

from absl import app, flags

from vdm_common import cli, entry

cli.check_config_overrides(sys.argv)          # before the config flag reads them
entry.define_flags("jax", multihost_help="Call jax.distributed.initialize() (cluster auto-detection).",
                   coordinator_help="host:port of process 0 (multi-host runs).")
# How to run, not what to train (not part of the config): vdm_jax.engine.EngineOptions.
flags.DEFINE_string("compilation_cache", None, "Directory of the persistent compilation cache, so that a run, eval "
                    "or sample of a config compiled before starts in seconds; default $JAX_COMPILATION_CACHE_DIR, "
                    "else ~/.cache/vdm/jax. --compilation_cache= turns it off.")
FLAGS = flags.FLAGS


def main(argv):
    from vdm_jax import engine

    def join():
        if FLAGS.multihost or FLAGS.coordinator_address:
            engine.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                          FLAGS.peer_timeout)

    options = engine.EngineOptions(compilation_cache=FLAGS.compilation_cache)
    return entry.run(argv, "jax", join, lambda: engine.Engine(options))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
