"""The one tolerance table of the parity suite.

TOLERANCES[quantity][dtype] bounds the worst relative error (compare.py) the two backends may show; the
measured worst values over the whole grid are in the parity report (`python -m parity_tests.report`),
and each bound keeps a margin of about 10x or more over them. Real bugs give errors of 1e-6 and up in
float64 (test_mutations.py), so float64 is where bugs are hunted; float32 shows how equal the backends
are in practice.

Why float32 is looser than its epsilon (1.2e-7) suggests: the Fourier features sin(2 pi 2^7 z) turn one
float32 ulp of z into ~1e-4 of absolute error in the features, and the backends round z_t differently
(their sigmoids differ in the last bit), so every quantity downstream of the features inherits ~1e-4
absolute noise in its derivatives; gradients of the noise-schedule parameters are small remainders of
large cancelling contributions; Adam divides by sqrt(nu), so a few steps carry those errors into the
moments and parameters. The report's "float32 rounding" column measures each backend's float32 result
against its own float64 result: the float32 difference between the backends is of that size or smaller,
for every quantity, so it is rounding and not a discrepancy.
"""
from __future__ import annotations

# Machine epsilons: float64 2.2e-16, float32 1.2e-7.
TOLERANCES: dict[str, dict[str, float]] = {
    # --- one forward pass on identical weights and inputs -------------------------------------------------
    # Sums of a few hundred terms per output in a different order on each side (XLA vs ATen convolutions,
    # GroupNorm statistics, attention softmax). Measured: float64 <= 3e-15, float32 8e-7.
    "unet_output": {"float64": 1e-13, "float32": 1e-5},
    # log_softmax over V bins of -0.5 ((z - v) / sigma_0)^2, logits up to ~1e6 (sigma_0 ~ 1e-3), relative
    # to the largest |log p|. Measured: float64 5e-16, float32 5e-7.
    "decoder_logprobs": {"float64": 1e-13, "float32": 1e-5},
    # exp of the above: the probabilities of the bins that matter, on scale 1. Measured: float64 1e-15,
    # float32 1.3e-7.
    "decoder_probs": {"float64": 1e-13, "float32": 1e-5},
    # The VLB terms per example. recon sums ~200 decoder values near 0 whose float32 error is set by the
    # large logits (measured: float64 1.2e-14, float32 5e-6); klz = 0.5 sum((1 - s) f^2 + s - log s - 1)
    # with s = sigmoid(gamma_1) ~ 0.9975 cancels three digits (float64 7e-14, float32 2.5e-5); diff =
    # gamma'(t) / 2 ||eps - eps_hat||^2 (float64 6e-15, float32 2.5e-6).
    "loss_recon": {"float64": 1e-12, "float32": 1e-4},
    "loss_klz": {"float64": 1e-12, "float32": 3e-4},
    "loss_diff": {"float64": 1e-12, "float32": 1e-4},
    # The batch bpd: the terms' errors partly average out. Measured: float64 6e-15, float32 3e-7.
    "bpd": {"float64": 1e-12, "float32": 1e-5},
    # --- gradients: different programs on each side (XLA autodiff vs ATen backward kernels). Measured:
    # float64 1.8e-11 per tensor (the worst: learnable_nnet's l1 bias gradient, a remainder of cancelling
    # terms, 2.5e-12 on the grid weights and 1.8e-11 on those with zeros; then the variance-minimising
    # case, 1.7e-11, whose custom VJP scales the ill-conditioned cotangents of the schedule's shape
    # network). float32 normwise (see FLOORS) 2.3e-3,
    # while each backend's own float32 gradient is up to 3.7e-3 from its float64 one (the report's
    # "float32 rounding"): through the Fourier features, the schedule's cancelling terms and that VJP.
    "grad_bpd": {"float64": 1e-10, "float32": 3e-2},
    # --- 50-step ancestral sampling (the trajectory relative to max|z|), with the sampling weights of
    # cases.sampling_weights. Measured: float64 5e-15, float32 4e-6.
    "sample_trajectory": {"float64": 1e-12, "float32": 1e-4},
    # Pixels whose decoded integers differ although their z_0 is farther from a bin boundary than the
    # trajectory tolerance allows (measure.py): none, in either dtype.
    "sample_images": {"float64": 0, "float32": 0},
    # --- 20 training steps (warmup, clipping, decay mask, EMA). Measured: float64 <= 1e-11 for every set
    # (the worst: the Adam mu of the schedule parameters, ill-conditioned as their gradients).
    # float32, normwise: params 1e-5, EMA 5e-6, mu 1.6e-3 (the schedule's mu: its gradient carries 5e-4;
    # each backend's own float32 mu is 1.5e-3 / 3e-3 from its float64 one), nu 4e-5.
    "train_params": {"float64": 1e-10, "float32": 1e-2},
    "train_ema": {"float64": 1e-10, "float32": 1e-2},
    "train_mu": {"float64": 1e-10, "float32": 2e-2},
    "train_nu": {"float64": 1e-10, "float32": 2e-3},
    # The loss and the pre-clipping gradient norm of each of the 20 steps. Measured: float64 1.6e-14 and
    # 5e-13, float32 8e-6 and 1.8e-4 (the norm includes the schedule's gradient).
    "train_bpd": {"float64": 1e-12, "float32": 1e-4},
    "train_grad_norm": {"float64": 1e-10, "float32": 2e-3},
    # Step counters (TrainState.step, the Adam count): integers, must be identical.
    "train_count": {"float64": 0, "float32": 0},
    # --- continued training: 5 steps in one backend, the full state through the neutral file, 10 in the
    # other, against 15 steps in the first. Same budget as the 20-step trajectories (measured <= 5.5e-12).
    "continued_params": {"float64": 1e-10},
    "continued_ema": {"float64": 1e-10},
    "continued_mu": {"float64": 1e-10},
    "continued_nu": {"float64": 1e-10},
    "continued_count": {"float64": 0},
}

# Floors of the per-tensor relative error of tensor sets (compare.tree_error), as a fraction of the
# largest max-norm in the set.
#  float64: 1e-3. Some tensors carry only rounding: the attention k/bias gradient is exactly zero (softmax
#    is invariant to the per-query constant q.b_k), so both sides hold noise (~1e-18 of the gradient scale,
#    relative error ~1 against itself), and so do its Adam moments; the gradient of learnable_nnet_
#    endpoints' inner l1 kernel is a ~1e-7 remainder of cancelling O(1) terms (its shape network is
#    normalised by f(1) - f(0)), accurate to ~1e-14 absolute only. Against the floor they count as absolute
#    errors at 1e-3 of the scale. A bug still shows: it changes a tensor by a fair fraction of its own
#    size, which against the floor is > 1e-10 for every tensor above ~1e-7 of the scale. For nu, a squared
#    gradient, the floor is squared.
#  float32: 1 (the set compared normwise). Float32 rounding at the scale of the largest contributions
#    reaches every tensor: the k/bias and l1-kernel gradients are then noise of ~1e-9 .. 1e-7, which Adam
#    (dividing by sqrt(nu) + 1e-8) turns into steps of a fair fraction of the learning rate, so those
#    parameters take different noise-driven paths on each side; the schedule biases' gradients are
#    remainders of cancelling terms. Per-tensor comparisons in float32 would measure that noise, not the
#    backends.
_F64_FLOOR = 1e-3
FLOORS: dict[str, dict[str, float]] = {
    "grad_bpd": {"float64": _F64_FLOOR, "float32": 1.0},
    "train_params": {"float64": _F64_FLOOR, "float32": 1.0},
    "train_ema": {"float64": _F64_FLOOR, "float32": 1.0},
    "train_mu": {"float64": _F64_FLOOR, "float32": 1.0},
    "train_nu": {"float64": _F64_FLOOR ** 2, "float32": 1.0},
    "continued_params": {"float64": _F64_FLOOR},
    "continued_ema": {"float64": _F64_FLOOR},
    "continued_mu": {"float64": _F64_FLOOR},
    "continued_nu": {"float64": _F64_FLOOR ** 2},
}


def tolerance(quantity: str, dtype: str) -> float:
    """TOLERANCES[quantity][dtype], with an error naming the missing entry."""
    try:
        return float(TOLERANCES[quantity][dtype])
    except KeyError:
        raise KeyError(f"no tolerance for {quantity!r} in {dtype}: add it to parity_tests/tolerances.py") from None


def floor(quantity: str, dtype: str) -> float:
    """FLOORS[quantity][dtype], with an error naming the missing entry."""
    try:
        return float(FLOORS[quantity][dtype])
    except KeyError:
        raise KeyError(f"no floor for {quantity!r} in {dtype}: add it to parity_tests/tolerances.py") from None
