"""Train, evaluate, sample from or plot a VDM with the PyTorch backend: the flags, modes, config files and run
directories of train_jax.py (see its docstring), into runs/<config name>_torch by default. A run directory
of either backend can be continued, evaluated or sampled here (the JAX run's neutral export is read):

    python train_torch.py --workdir=runs/quickstart_jax --mode=eval     # a JAX run, converted on the fly

Data parallelism: one process per device, started by torchrun (DistributedDataParallel; nccl on GPUs, gloo
on CPUs); training.batch_size_train is the GLOBAL batch, split evenly over the processes:
    torchrun --nproc_per_node=8 train_torch.py --config=configs/cifar10.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train_torch.py ...
or, as with train_jax.py, --coordinator_address=HOST0:PORT --num_processes=N --process_id=I per process.

Speed options (the function trained is the same): --compile (torch.compile), --channels_last, --fused_adamw
(default on), and --config.model.compute_dtype=bfloat16 (bf16 autocast; a model field, part of the config).
"""
import sys

from absl import app, flags

from vdm_common import cli, entry

cli.check_config_overrides(sys.argv)          # before the config flag reads them
entry.define_flags("torch", multihost_help="Join the process group from torchrun's environment (implied when "
                                           "torchrun started this process).",
                   coordinator_help="host:port of process 0 (multi-process runs without torchrun).")
# How to run, not what to train (not part of the config): vdm_torch.engine.EngineOptions.
flags.DEFINE_string("device", None, "cpu, cuda or cuda:N; default cuda:LOCAL_RANK when GPUs are present, else cpu.")
flags.DEFINE_bool("compile", False, "torch.compile the training forward pass.")
flags.DEFINE_bool("channels_last", False, "channels_last memory format for the model and batches.")
flags.DEFINE_bool("fused_adamw", True, "Fused AdamW where torch has it (CPU and CUDA).")
FLAGS = flags.FLAGS


def main(argv):
    from vdm_torch import engine

    def join():
        if FLAGS.multihost or FLAGS.coordinator_address or engine.torchrun_environment():
            engine.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                          FLAGS.device)

    options = engine.EngineOptions(device=FLAGS.device, compile=FLAGS.compile, channels_last=FLAGS.channels_last,
                                   fused_adamw=None if FLAGS.fused_adamw else False)
    return entry.run(argv, "torch", join, lambda: engine.Engine(options), leave=engine.shutdown_distributed)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
