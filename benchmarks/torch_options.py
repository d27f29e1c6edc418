"""torch's speed options, each timed against the default on the same model and batch, in one process.

    python -m benchmarks.torch_options                                    # small float32, every option
    python -m benchmarks.torch_options --sizes=cifar10 --dtypes=bfloat16,float32 --options=cudnn_benchmark

Options (none changes the function trained; each gets a fresh training state):
  cudnn_benchmark  torch.backends.cudnn.benchmark = True: cuDNN times its convolution algorithms at the first
                   call of each shape and keeps the fastest (GPU only; a no-op on a CPU)
  channels_last    model, AdamW moments and batch in channels_last memory (train_torch.py --channels_last)
  compile          torch.compile of the score UNet (train_torch.py --compile); its compilation falls in the
                   warm-up steps, so give --warmup enough of them
Options combine with '+' (--options=channels_last+compile+cudnn_benchmark). The sizes and dtypes are
benchmarks/bench.py's. Prints, per option, the first step's time (compile and cuDNN's algorithm search fall
in it), the median [min, max] training step of --steps steps after --warmup, its ratio to the default's and,
on a GPU, the peak device memory; --out writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json

from benchmarks.bench import SIZES, summarise, torch_setup, torch_timed

OPTIONS = ("cudnn_benchmark", "channels_last", "compile")


def time_option(option: str, size: str, dtype: str, steps: int, warmup: int) -> dict:
    """First step, median and spread of the training step with the options of `option` ('default': none;
    'a+b': both), on a fresh state."""
    import torch

    from vdm_torch import steps as tsteps
    from vdm_torch.engine import make_forward, to_channels_last

    chosen = set(option.split("+"))
    device, mc, opt, state, generator, x, c = torch_setup(size, dtype)
    if "channels_last" in chosen:
        state = to_channels_last(state)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = make_forward(state.model, torch.device(device), compile="compile" in chosen)
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in chosen
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        def step():
            tsteps.train_step(mc, opt, state, x, c, generator=generator, forward=forward)

        first = torch_timed(step, 1, device)[0]
        torch_timed(step, warmup, device)
        times = torch_timed(step, steps, device)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        return dict(option=option, size=size, dtype=dtype, device=device, first_step_s=first,
                    train=summarise(times), peak_memory_bytes=peak)
    finally:
        torch.backends.cudnn.benchmark = benchmark_before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma list of {list(OPTIONS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args(argv)
    options = [o for o in args.options.split(",") if o]
    parts = [part for option in options for part in option.split("+")]
    for flag, given, known in (("--options", parts, OPTIONS), ("--sizes", args.sizes.split(","), SIZES)):
        if set(given) - set(known):
            parser.error(f"{flag}: unknown {sorted(set(given) - set(known))}; choose from {sorted(known)}")
    results = []
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            default = None
            for option in ["default"] + options:
                r = time_option(option, size, dtype, args.steps, args.warmup)
                default = default or r["train"]["median"]
                r["ratio_to_default"] = r["train"]["median"] / default
                results.append(r)
                t = r["train"]
                memory = "" if r["peak_memory_bytes"] is None else f", peak {r['peak_memory_bytes'] / 2**30:.1f} GiB"
                print(f"{size} {dtype} {option} on {r['device']}: first step {r['first_step_s']:.1f} s, then "
                      f"{t['median']:.4f} s/step [{t['min']:.4f}, {t['max']:.4f}], {r['ratio_to_default']:.2f}x "
                      f"the default's time{memory}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
