"""Converts VDM weights and training states between the backends' files and the neutral file.

    python convert.py --from=run/checkpoints/ckpt_5000.pt --to=ckpt_5000.safetensors
    python convert.py --from=ckpt_5000.safetensors --to=ckpt_5000.pt --config=configs/cifar10.py
    python convert.py --from=ckpt_5000.safetensors --to=ema.msgpack --weights=ema_params
    python convert.py --from=params.msgpack --to=params.safetensors --config=configs/quickstart.py
    python convert.py --from-upstream=official --from=ckpt/checkpoints-0 --config=configs/cifar10.py --to=runs/c10
    python convert.py --from-upstream=pytorch-port --from=results/my_run --to=runs/port_run

Files, by extension:
  .safetensors   the neutral checkpoint (vdm_common.neutral): params, EMA, AdamW moments, step, model config.
                 Both trainers read it; the JAX trainer writes it beside its orbax checkpoints.
  .pt / .pth     a torch checkpoint {'model', 'ema', 'optimizer', 'step', 'model_config'} (vdm_torch.convert)
                 or a plain state_dict.
  .msgpack       a flax msgpack of one parameter tree (flax.serialization.to_bytes(params)).

--from-upstream imports a checkpoint of the upstream implementations (vdm_common.upstream): `official`
(a clu checkpoint directory of google-research/vdm; needs --config, e.g. configs/cifar10.py) or
`pytorch-port` (a run directory of the original PyTorch port with model.pt and config.yaml). Its --to is a
.safetensors file, or a directory: a new run directory (config.json + the neutral checkpoint) from which
`train_jax.py` / `train_torch.py --workdir=DIR --mode=eval|sample|train` continue.

--config=FILE (a configs/*.py file, with --config.section.field=value overrides) supplies the model config
for sources that have none (msgpack, plain state_dict; when both exist they must agree) and the optimizer
settings that a torch AdamW state_dict records (needed to write a .pt with optimizer state).

Conversion is strict and exact: every tensor must map one to one onto the model (else the error lists the
missing, unexpected and mis-shaped keys) and values are copied bit for bit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vdm_common.errors import UserError
from vdm_common.weights import ConversionError

NEUTRAL_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")
JAX_SUFFIXES = (".msgpack",)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    for kind, suffixes in (("neutral", NEUTRAL_SUFFIXES), ("torch", TORCH_SUFFIXES), ("jax", JAX_SUFFIXES)):
        if suffix in suffixes:
            return kind
    raise ConversionError(f"{path}: unknown file type {suffix!r}; use .safetensors (neutral), .pt / .pth (torch) "
                          f"or .msgpack (flax parameters)")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `error: ...` line and exit status 1, as the trainers'."""

    def error(self, message: str):
        print(f"error: {message}; see convert.py --help", file=sys.stderr)
        sys.exit(1)


def _parse(argv):
    parser = _Parser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--from", dest="src", required=True, help="the file to read")
    parser.add_argument("--to", dest="dst", required=True, help="the file to write")
    parser.add_argument("--config", default=None, help="a config file (configs/*.py) for the model / optimizer")
    parser.add_argument("--weights", default="params", choices=("params", "ema_params"),
                        help="which weights a .msgpack target receives (default: params)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --to file")
    parser.add_argument("--from-upstream", choices=("official", "pytorch-port"), default=None,
                        help="read --from as an upstream checkpoint (see above)")
    parser.add_argument("--checkpoint-number", type=int, default=None,
                        help="official only: which ckpt-N to read (default: the latest)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and not args.config:
        parser.error("--config.x=y overrides need --config=FILE")
    return args, overrides


def convert(src: Path, dst: Path, config=None, weights: str = "params", overwrite: bool = False):
    """Reads `src` and writes `dst` (kinds from the extensions); returns the NeutralCheckpoint in between."""
    from vdm_common.config import model_config as model_config_of
    from vdm_common.neutral import load_neutral, save_neutral

    src_kind, dst_kind = _kind(src), _kind(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; pass --overwrite to replace it")
    if src.resolve() == dst.resolve():
        raise ConversionError(f"--from and --to are the same file ({src})")
    model_config = model_config_of(config) if config is not None else None

    if src_kind == "neutral":
        ckpt = load_neutral(src)
        if model_config is not None and model_config != ckpt.model_config:
            diff = [f"{k}: file={v!r} config={getattr(model_config, k)!r}"
                    for k, v in ckpt.model_config.to_dict().items() if getattr(model_config, k) != v]
            raise ConversionError(f"{src}: its model config differs from --config's: {diff}")
    elif src_kind == "torch":
        from vdm_torch import convert as torch_convert
        ckpt = torch_convert.load_native(src, model_config)
    else:
        from vdm_jax import convert as jax_convert
        ckpt = jax_convert.load_native(src, model_config)
    ckpt.extra.setdefault("source", str(src))

    if dst_kind == "neutral":
        save_neutral(dst, ckpt)
    elif dst_kind == "torch":
        from vdm_torch import convert as torch_convert
        torch_convert.save_native(dst, ckpt, config.optimizer if config is not None else None)
    else:
        from vdm_jax import convert as jax_convert
        jax_convert.save_native(dst, ckpt, weights)
    return ckpt


def import_upstream(kind: str, src: Path, dst: Path, config=None, number: int | None = None):
    """Reads an upstream checkpoint and writes a neutral file, or a run directory both trainers continue."""
    from vdm_common import neutral, upstream, workdir as workdir_lib

    imp = upstream.read_upstream(kind, src, config, number)
    print(imp.summary())
    ckpt = imp.to_neutral()
    if dst.suffix.lower() in NEUTRAL_SUFFIXES:
        if dst.exists():
            raise ConversionError(f"{dst} exists; choose a new --to")
        neutral.save_neutral(dst, ckpt)
        return ckpt
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} is not empty; --to must be a new run directory")
    workdir_lib.prepare_workdir(dst, imp.config, backend=f"upstream:{kind}")
    neutral.save_neutral(workdir_lib.layout(dst).neutral_path(ckpt.step), ckpt)
    return ckpt


def main(argv=None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    from vdm_common.config import load_config

    try:
        config = load_config(args.config, overrides) if args.config else None
        if args.from_upstream:
            ckpt = import_upstream(args.from_upstream, Path(args.src), Path(args.dst), config,
                                   args.checkpoint_number)
            print(f"{args.src} -> {args.dst}: step {ckpt.step}")
            return 0
        ckpt = convert(Path(args.src), Path(args.dst), config, args.weights, args.overwrite)
    except (UserError, OSError) as e:          # OSError: a path that cannot be read or written
        print(f"error: {_describe(e)}", file=sys.stderr)
        return 1
    if _kind(Path(args.dst)) == "jax":
        parts = [args.weights]
    else:
        parts = ["params"] + (["ema_params"] if ckpt.ema_params is not None else []) + \
            ([f"AdamW state (count {ckpt.opt_count})"] if ckpt.has_optimizer else [])
    print(f"{args.src} -> {args.dst}: {len(ckpt.params)} tensors each of {', '.join(parts)}; step {ckpt.step}")
    return 0


def _describe(error: Exception) -> str:
    """The message of an error; for an OS error on a path (--to in a folder that is a file, no permission),
    the path and the reason."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}; check the --from and --to paths"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
