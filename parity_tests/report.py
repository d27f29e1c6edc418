"""The parity report: how equal the two backends are, per quantity, dtype and configuration.

    python -m parity_tests.report --out=DIR          # writes DIR/parity_report.md and DIR/parity_report.json

It runs the same measure_* functions as the pytest suite (which writes the same report into its
--basetemp directory and prints the summary), so the report and the tests cannot disagree. Each number is
the worst relative error of a quantity (compare.py: max-norm of the difference over max-norm of the
values; per tensor for gradients, parameters and moments) next to its tolerance (tolerances.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from parity_tests.compare import Measurement

SECTIONS = (
    ("model", ("unet_output", "decoder_logprobs", "decoder_probs", "loss_recon", "loss_klz", "loss_diff", "bpd",
               "grad_bpd")),
    ("sampling", ("sample_trajectory", "sample_images")),
    ("training (20 steps)", ("train_params", "train_ema", "train_mu", "train_nu", "train_bpd", "train_grad_norm",
                             "train_count")),
    ("continued training (5 + 10 steps across backends)", ("continued_params", "continued_ema", "continued_mu",
                                                           "continued_nu", "continued_count")),
)
COUNT_QUANTITIES = ("sample_images", "train_count", "continued_count")


@dataclasses.dataclass
class MutationResult:
    """A deliberate bug and whether the comparison caught it (which quantities failed, how badly)."""

    name: str
    case: str
    dtype: str
    caught_by: list[str]          # failing quantities
    expected: list[str]           # quantities that must be among them (at least one)
    worst: str                    # description of the worst failing measurement
    only: bool = False            # the failing quantities must be exactly `expected`

    @property
    def ok(self) -> bool:
        if self.only:
            return set(self.caught_by) == set(self.expected)
        return bool(set(self.caught_by) & set(self.expected))


def mutation_result(mutation, measurements: Sequence[Measurement], dtype: str = "float64") -> MutationResult:
    failing = [m for m in measurements if not m.ok]
    worst = max(failing, key=lambda m: m.error / max(m.tolerance, 1e-300), default=None)
    return MutationResult(mutation.name, mutation.case, dtype, [m.quantity for m in failing],
                          list(mutation.catches), worst.describe() if worst else "", mutation.only)


def _fmt(m: Measurement) -> str:
    if m.quantity in COUNT_QUANTITIES:
        text = f"{int(m.error)}" if math.isfinite(m.error) else "inf"
    else:
        text = f"{m.error:.1e}"
    return text if m.ok else f"**FAIL {text}**"


def _tol(quantity: str, tolerance: float) -> str:
    return f"{int(tolerance)}" if quantity in COUNT_QUANTITIES else f"{tolerance:.0e}"


def markdown(measurements: Sequence[Measurement], mutations: Sequence[MutationResult] = (),
             title: str = "Parity report: JAX vs PyTorch") -> str:
    """The report as markdown: a summary (worst per quantity and dtype), then every case."""
    by = defaultdict(list)
    for m in measurements:
        by[(m.quantity, m.dtype)].append(m)
    dtypes = [d for d in ("float64", "float32") if any(m.dtype == d for m in measurements)]
    lines = [f"# {title}", ""]
    n_fail = sum(not m.ok for m in measurements)
    lines.append(f"{len(measurements)} comparisons, {n_fail} over tolerance. Errors are worst relative errors "
                 f"(counts for integer quantities); see parity_tests/compare.py and tolerances.py.")
    lines += ["", "## Summary: worst over all configurations", ""]
    rounding_note = ("float32 rounding: the larger of each backend's own float32 error against its float64 "
                     "result (same metric), worst over the configurations; the float32 difference between "
                     "the backends is of that size or smaller.")
    header, rule = ["quantity"], ["---"]
    for d in dtypes:
        header += [f"{d} worst", f"{d} tolerance", f"{d} worst case"] + (["float32 rounding"] if d == "float32"
                                                                          else [])
        rule += ["---"] * (4 if d == "float32" else 3)
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for _, quantities in SECTIONS:
        for q in quantities:
            cells = []
            for d in dtypes:
                group = by.get((q, d))
                extra = 1 if d == "float32" else 0
                if not group:
                    cells += [""] * (3 + extra)
                    continue
                worst = max(group, key=lambda m: (not m.ok, m.error))
                cells += [_fmt(worst), _tol(q, worst.tolerance), worst.config]
                if extra:
                    rounding = [m.rounding for m in group if math.isfinite(m.rounding)]
                    cells.append(f"{max(rounding):.1e}" if rounding else "")
            if any(cells):
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
    if "float32" in dtypes:
        lines += ["", rounding_note]
    for section, quantities in SECTIONS:
        for d in dtypes:
            rows = [m for m in measurements if m.quantity in quantities and m.dtype == d]
            if not rows:
                continue
            configs = list(dict.fromkeys(m.config for m in rows))
            cell = {(m.quantity, m.config): m for m in rows}
            lines += ["", f"## {section}, {d}", ""]
            lines.append("| quantity | tolerance | " + " | ".join(configs) + " |")
            lines.append("|---|---|" + "---|" * len(configs))
            for q in quantities:
                present = [cell.get((q, c)) for c in configs]
                if not any(present):
                    continue
                tol = next(m.tolerance for m in present if m)
                lines.append(f"| {q} | {_tol(q, tol)} | " + " | ".join(_fmt(m) if m else "" for m in present) + " |")
    failures = [m for m in measurements if not m.ok]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {m.describe()}" for m in failures]
    if mutations:
        lines += ["", "## Mutation checks: deliberate bugs in the torch side must fail the comparison", ""]
        lines.append("| mutation | case | dtype | caught | failing quantities | worst failure |")
        lines.append("|---|---|---|---|---|---|")
        for r in mutations:
            worst = r.worst.replace("|", "/")
            lines.append(f"| {r.name} | {r.case} | {r.dtype} | {'yes' if r.ok else '**NO**'} | "
                         f"{', '.join(r.caught_by) or '-'} | {worst} |")
    lines += ["", f"Environment: {json.dumps(environment())}", ""]
    return "\n".join(lines)


def environment() -> dict:
    import jax
    import numpy
    import torch
    out = dict(python=platform.python_version(), platform=platform.platform(), machine=platform.machine(),
               numpy=numpy.__version__, jax=jax.__version__, torch=torch.__version__,
               jax_backend=jax.default_backend(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    for name in ("jaxlib", "flax", "optax"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return out


def write_report(out_dir: str | Path, measurements: Sequence[Measurement],
                 mutations: Sequence[MutationResult] = ()) -> tuple[Path, Path]:
    """Writes parity_report.md and parity_report.json into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "parity_report.md", out / "parity_report.json"
    md.write_text(markdown(measurements, mutations))
    js.write_text(json.dumps(dict(environment=environment(), measurements=[m.to_json() for m in measurements],
                                  mutations=[dict(dataclasses.asdict(r), ok=r.ok) for r in mutations]),
                             indent=1) + "\n")
    return md, js


def run_mutations(names: Iterable[str] | None = None) -> list[MutationResult]:
    from parity_tests import mutations as mutations_lib
    wanted = set(names) if names else None
    return [mutation_result(m, mutations_lib.run(m)) for m in mutations_lib.MUTATIONS
            if wanted is None or m.name in wanted]


def main(argv=None) -> int:
    from parity_tests import cases, measure
    from parity_tests.policy import parity_mode

    parser = argparse.ArgumentParser(prog="python -m parity_tests.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for parity_report.md / .json")
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {', '.join(cases.MODEL_CASES)}")
    parser.add_argument("--dtypes", default=",".join(cases.DTYPES), help="comma-separated subset of "
                        f"{', '.join(cases.DTYPES)}")
    parser.add_argument("--no-mutations", action="store_true", help="skip the mutation checks")
    args = parser.parse_args(argv)
    case_names = [c for c in args.cases.split(",") if c] or list(cases.MODEL_CASES)
    unknown = sorted(set(case_names) - set(cases.MODEL_CASES)) + sorted(
        set(d for d in args.dtypes.split(",") if d) - set(cases.DTYPES))
    if unknown:
        parser.error(f"unknown cases / dtypes: {unknown}")
    start = time.time()
    with parity_mode():
        measurements = measure.measure_all(case_names, tuple(d for d in args.dtypes.split(",") if d))
        mutation_results = [] if args.no_mutations else run_mutations()
    md, js = write_report(args.out, measurements, mutation_results)
    bad = sum(not m.ok for m in measurements) + sum(not r.ok for r in mutation_results)
    print(markdown(measurements, mutation_results))
    print(f"wrote {md} and {js} in {time.time() - start:.0f}s; {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
