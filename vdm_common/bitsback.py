"""Bits-back coding of images with a VDM's discrete-time model: numpy + constriction, no framework.

The discrete-time model with T steps (z_i at t_i = i/T, any trained model: same gamma and score network)
is coded with a stack (ANS) coder in the bit-swap order, per chunk of B images, each op one vector op:

    compress:    pop z_0 ~ q(z_0 | x);  push x ~ p(x | z_0)
                 for i = 1..T:  pop z_i ~ q(z_i | z_{i-1});  push z_{i-1} ~ p(z_{i-1} | z_i)
                 push z_T ~ N(0, I)
    decompress:  the same list backwards, each push a pop and each pop a push.

Each push is the exact inverse of a pop, so the decoder retraces the encoder. Net cost per image:
-log p(x, z) + log q(z | x), the single-sample discrete-time VLB (recon + klz + diff); about two latents
are on loan at a time, so the initial bits are about one image's worth, paid once per file. z_i lives on
a grid 2^-k of the std of q, which it is popped from (k = grid_bits), and both its ops share a window, so
constriction's probability floor cancels; q-pops rotate their slot by a pseudo-random dither first (the
top of a stack is the quantile of what was just pushed, not random bits). Chunks grow as the stack fills;
the decoder rebuilds the same chunks, so the model sees the same batches. README "Lossless compression":
the derivation, measurements and limits (decode with the backend and device kind that encoded).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, Protocol

import constriction
import numpy as np

from vdm_common.config import ModelConfig
from vdm_common.integrity import digest_arrays
from vdm_common.run import RunError, eval_bound
from vdm_common.types import Noise

DEFAULT_TIMESTEPS = 100  # T where none is named (README "Lossless compression": rate against speed)
GRID_BITS = 3            # latent bins 2^-3..2^-4 of the std of q, which they are popped from: a finer grid
                         # costs more at large T (constriction's 24-bit probabilities; README)
WINDOW_STDS = 8          # each latent is coded in a window of +-8 stds of the wider Gaussian (p's may widen)
MAX_BATCH = 256          # images per UNet call at most
PROBE_CHUNKS = 4         # single-image chunks coded first; their costs set the growth of the later chunks
PEAK_MARGIN = 1.25       # the growth plans for 1.25x the probe's worst loan per image ...
NET_MARGIN = 0.8         # ... and 0.8x its mean net cost per image
POOL_SEED = 0x76646D7A   # the pseudo-random initial bits: words of PCG64(POOL_SEED)'s raw stream
WINDOW_SCALES = (1, 4, 16, 64, 256, 1024)   # the widths a window of p may take, coded per op
_SCALE_PROBS = np.array([1.0] + [2.0 ** -20] * (len(WINDOW_SCALES) - 1))
_MAX_WINDOW = 1 << 22    # symbols per window at most (constriction's probabilities have 24 bits) ...
_MAX_BASE_WINDOW = 1 << 16   # ... and before widening
DITHER_BITS = 6          # q-pops first rotate the top 6 bits of their slots (see _Coder.pop_gaussian)
_DITHER = 1 << DITHER_BITS

Progress = Callable[[int], None]


class CompressionError(RunError):
    """Data that cannot be compressed or decompressed as asked (wrong model or T, damaged or truncated
    file, images outside the model's range); the message says what is wrong and what to do. Nothing is
    written when it is raised."""


class ModelFace(Protocol):
    """What the coder asks of a backend (vdm_jax.compress.ModelFace, vdm_torch.compress.ModelFace).

    Arrays are numpy NHWC float64 in and out; the face casts to its model's dtype and layout. Calls with
    equal inputs (same values, same batch size) must return bit-identical outputs: the decoder repeats the
    encoder's calls exactly and relies on it.
    """

    model_config: ModelConfig
    backend: str          # "jax" | "torch"
    device: str           # "cpu" | "gpu" | "tpu" | ...: floating-point results differ between devices
    digest: str           # model_digest() of the config and weights

    def gamma(self, t: np.ndarray) -> np.ndarray: ...                     # (n,) times -> (n,) gamma(t)
    def eps_hat(self, z_t: np.ndarray, t: float) -> np.ndarray: ...       # (B, H, W, C) -> (B, H, W, C)
    def decoder_logprobs(self, z_0: np.ndarray) -> np.ndarray: ...        # (B, H, W, C) -> (B, H, W, C, V)
    def loss_terms(self, model_config: ModelConfig, images: np.ndarray, noise: Noise) -> dict: ...  # discrete_vlb


def model_digest(model_config: ModelConfig, neutral_params: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the model config and the weights in neutral form (vdm_common.weights' names and
    JAX layouts), so the same weights give the same digest in either backend."""
    return digest_arrays([("model_config", model_config.to_json())]
                         + [(f"params/{k}", np.asarray(v)) for k, v in neutral_params.items()])


# ------------------------------------------------------------------------------------------- the schedule

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every constant of the coder for T steps, from gamma at t_i = i/T (float64 lists indexed by i).

    var = sigma_i^2, alpha = alpha_i, c_i = 1 - SNR(t_i)/SNR(t_{i-1}) (c[0] unused);
    fwd_std[i]: q(z_i | z_{i-1}) (i >= 1) and q(z_0 | x) (i = 0); p_std[i]: p(z_i | z_{i+1}) (i < T) and
    N(0, 1) (i = T); exponent[i]: z_i is coded on the grid 2^exponent[i], 2^-k..2^-(k+1) of fwd_std[i];
    window[i]: symbols +-window[i], 8 stds of the wider of the two.
    """

    timesteps: int
    gamma: list
    var: list
    alpha: list
    c: list
    fwd_std: list
    p_std: list
    exponent: list
    window: list

    @classmethod
    def build(cls, gamma: np.ndarray, grid_bits: int) -> "Schedule":
        g = [float(v) for v in np.asarray(gamma, np.float64)]
        T = len(g) - 1
        if not all(math.isfinite(v) for v in g):
            raise CompressionError(f"the model's gamma is not finite on the grid t = i/{T}: {g[:4]}...")
        bad = [i for i in range(1, T + 1) if not g[i] > g[i - 1]]
        if bad:
            raise CompressionError(f"the model's gamma does not increase between t = {bad[0] - 1}/{T} and "
                                   f"{bad[0]}/{T} ({g[bad[0] - 1]!r} -> {g[bad[0]]!r}) at the model's precision: "
                                   f"bits-back coding needs a noise level that grows every step; use fewer "
                                   f"timesteps")
        var = [_sigmoid(v) for v in g]
        alpha = [math.sqrt(_sigmoid(-v)) for v in g]
        c = [1.0] + [-math.expm1(g[i - 1] - g[i]) for i in range(1, T + 1)]
        fwd_std = [math.sqrt(var[0])] + [math.sqrt(var[i] * c[i]) for i in range(1, T + 1)]
        p_std = [math.sqrt(var[i] * c[i + 1]) for i in range(T)] + [1.0]
        exponent, window = [], []
        for i in range(T + 1):
            # The grid is set by q, which z_i is popped from: its 2^k bins per std are the bits on loan.
            e = math.floor(math.log2(fwd_std[i])) - grid_bits
            k = math.ceil(WINDOW_STDS * max(fwd_std[i], p_std[i]) / 2.0 ** e)
            if 2 * k + 1 > _MAX_BASE_WINDOW:
                raise CompressionError(f"latent z_{i} would need {2 * k + 1} symbols (its two Gaussians have "
                                       f"stds {fwd_std[i]:.3g} and {p_std[i]:.3g}); use fewer timesteps or a "
                                       f"smaller grid_bits")
            exponent.append(e)
            window.append(k)
        return cls(T, g, var, alpha, c, fwd_std, p_std, exponent, window)

    def q_forward_mean(self, i: int, z_prev: np.ndarray | None, f: np.ndarray | None) -> np.ndarray:
        """Mean of q(z_i | z_{i-1}) (alpha_i / alpha_{i-1} z_{i-1}), or of q(z_0 | x) (alpha_0 f) for i = 0."""
        if i == 0:
            return self.alpha[0] * f
        return (self.alpha[i] / self.alpha[i - 1]) * z_prev

    def p_mean(self, i: int, z_t: np.ndarray, eps_hat: np.ndarray) -> np.ndarray:
        """Mean of p(z_{i-1} | z_i): alpha_{i-1} / alpha_i (z_i - sigma_i c_i eps_hat), as vdm.sample_step."""
        return (self.alpha[i - 1] / self.alpha[i]) * (z_t - math.sqrt(self.var[i]) * self.c[i] * eps_hat)

    def q_posterior_mean(self, i: int, z_t: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Mean of q(z_{i-1} | z_i, x): alpha_{i-1} / alpha_i (1 - c_i) z_i + alpha_{i-1} c_i f (variance
        p_std[i-1]^2, the same as p's)."""
        return (self.alpha[i - 1] / self.alpha[i]) * (1.0 - self.c[i]) * z_t + self.alpha[i - 1] * self.c[i] * f


def grid_times(timesteps: int) -> np.ndarray:
    """t_i = i / T, i = 0..T (float64)."""
    return np.arange(timesteps + 1, dtype=np.float64) / timesteps


def encode_values(x: np.ndarray, vocab_size: int) -> np.ndarray:
    """Integers in [0, V) -> bin centres 2 (x + 1/2) / V - 1 in float64 (vdm.VDM.encode)."""
    return 2.0 * ((x.astype(np.float64) + 0.5) / vocab_size) - 1.0


# ------------------------------------------------------------------------------------------- the coder

def _rotations(key: int, n: int) -> np.ndarray:
    """The dither of the n q-pops of latent `key`: DITHER_BITS-bit pseudo-random integers (same on both sides)."""
    raw = np.random.PCG64([POOL_SEED, key, n]).random_raw(n)
    return (raw >> np.uint64(64 - DITHER_BITS)).astype(np.int64)


class _Coder:
    """An AnsCoder with the two kinds of vector op the model needs, each push the exact inverse of a pop.

    A Gaussian op codes grid offsets from the centre of a window of +-window symbols. The windows of the
    model's p(z_{i-1} | z_i) may widen, by one of WINDOW_SCALES, when a coded value lies outside (a poor
    prediction): the scale is one more symbol, pushed after the values, almost free when it is 1.
    """

    def __init__(self, words: np.ndarray):
        self.ans = constriction.stream.stack.AnsCoder(words)
        self._families: dict[int, object] = {}
        self._categorical = constriction.stream.model.Categorical(perfect=False)
        self._scale = constriction.stream.model.Categorical(_SCALE_PROBS, perfect=False)
        self._dither = constriction.stream.model.Uniform(_DITHER)
        self.widened = 0                          # Gaussian ops that needed a wider window
        self.low = self.ans.num_valid_bits()      # the lowest size the stack reached since reset

    def bits(self) -> int:
        return self.ans.num_valid_bits()

    def _note_low(self) -> None:
        self.low = min(self.low, self.ans.num_valid_bits())

    def _family(self, window: int):
        if window not in self._families:
            self._families[window] = constriction.stream.model.QuantizedGaussian(-window, window)
        return self._families[window]

    def _params(self, mean, std, exponent):
        scale = 2.0 ** -exponent                    # exact: a power of two
        m = (mean * scale).reshape(-1)
        centre = np.floor(m + 0.5)
        stds = np.broadcast_to(np.asarray(std * scale, np.float64), m.shape)
        return centre.astype(np.int64), m - centre, np.ascontiguousarray(stds)

    def push_gaussian(self, j: np.ndarray, mean, std, exponent: int, window: int, key: int | None = None) -> None:
        """Pushes grid indices j (z = j 2^exponent) under N(mean, std^2) on the grid.

        key None: the model's p, whose window may widen. key = i: the posterior q of latent z_i, whose values
        were popped from its window, undoing the dither of pop_gaussian (the rotation of latent i).
        """
        centre, offset, stds = self._params(mean, std, exponent)
        r = j.reshape(-1) - centre
        far = int(np.abs(r).max(initial=0))
        level = next((k for k, f in enumerate(WINDOW_SCALES) if far <= f * window and (key is None or k == 0)
                      and 2 * f * window + 1 <= _MAX_WINDOW), None)
        if level is None:
            raise CompressionError(f"a latent lies {far / window * WINDOW_STDS:.0f} stds from the model's "
                                   f"prediction, beyond what the coder codes ({WINDOW_SCALES[-1] * WINDOW_STDS} "
                                   f"stds): the model fits these images too poorly at this T")
        self.ans.encode_reverse(r.astype(np.int32), self._family(WINDOW_SCALES[level] * window), offset, stds)
        if key is None:
            self.ans.encode_reverse(np.array([level], np.int32), self._scale)
            self.widened += level > 0
        else:
            w = self.ans.decode(self._dither, len(r)).astype(np.int64)
            self.ans.encode_reverse(((w - _rotations(key, len(r))) % _DITHER).astype(np.int32), self._dither)

    def pop_gaussian(self, mean, std, exponent: int, window: int, key: int | None = None) -> np.ndarray:
        """Pops grid indices under N(mean, std^2) on the grid (the inverse of push_gaussian).

        For q (key = i) the top DITHER_BITS of each slot it reads are first rotated by a pseudo-random amount:
        right after a push the stack's top slots are the quantiles of the values just pushed, far from
        uniform when the model misfits, and the pops would inherit them; rotated, they are uniform.
        """
        centre, offset, stds = self._params(mean, std, exponent)
        if key is None:
            level = int(self.ans.decode(self._scale, 1)[0])
            self.widened += level > 0
        else:
            level = 0
            v = self.ans.decode(self._dither, len(offset)).astype(np.int64)
            self._note_low()
            self.ans.encode_reverse(((v + _rotations(key, len(offset))) % _DITHER).astype(np.int32), self._dither)
        r = self.ans.decode(self._family(WINDOW_SCALES[level] * window), offset, stds).astype(np.int64)
        self._note_low()
        return (centre + r).reshape(np.shape(mean))

    def push_categorical(self, x: np.ndarray, probs: np.ndarray) -> None:
        self.ans.encode_reverse(x.reshape(-1).astype(np.int32), self._categorical, probs.reshape(x.size, -1))

    def pop_categorical(self, probs: np.ndarray, shape) -> np.ndarray:
        x = self.ans.decode(self._categorical, probs.reshape(-1, probs.shape[-1]))
        self._note_low()
        return x.reshape(shape)


# -------------------------------------------------------------------------------------- what one chunk costs

@dataclasses.dataclass
class ChunkCost:
    """The stack sizes around one chunk (bits): before, after, and the lowest it reached in between."""

    size: int
    before: int
    after: int
    low: int

    @property
    def loan_per_image(self) -> float:
        return (self.before - self.low) / self.size

    @property
    def net_per_image(self) -> float:
        return (self.after - self.before) / self.size


@dataclasses.dataclass
class Terms:
    """Per-image codelength terms in nats on the latents actually coded (each (N,) float64), in the order of
    the input images: the single-sample bound -log p(x, z) + log q(z | x) split as vdm.py's loss splits it,
    and the same terms with the Gaussian KLs in closed form given the coded z_i (lower variance)."""

    recon: np.ndarray          # -log p(x | z_0)
    prior: np.ndarray          # log q(z_1 | x) - log N(z_1; 0, I)
    diff: np.ndarray           # sum_i log q(z_{i-1} | z_i, x) - log p(z_{i-1} | z_i)
    klz: np.ndarray            # KL(q(z_1 | x) || N(0, I)), as vdm.py's klz
    diff_kl: np.ndarray        # sum_i KL(q(z_{i-1} | z_i, x) || p(z_{i-1} | z_i)) at the coded z_i
    noise_sq: np.ndarray       # sum of the squared standardised noises of the q-pops (expected (T + 1) H W C)

    @property
    def total(self) -> np.ndarray:
        return self.recon + self.prior + self.diff


@dataclasses.dataclass
class Stream:
    """A coded set of images: what the file format stores, plus what the encoder measured (not stored).

    The coder starts on initial_words(pool_words) with the `top` words above them (the first bits the
    encoder borrows; the file format puts the images' SHA-256 there, and the decoder recovers it when it
    ends). words: the final stack without its first `kept` words (kept <= pool_words), which equal
    initial_words(pool_words)[:kept] and are rebuilt by the decoder.
    """

    timesteps: int
    num_images: int
    image_shape: tuple
    grid_bits: int
    max_batch: int
    growth: int
    pool_words: int
    kept: int
    words: np.ndarray
    top_words: int = 0
    chunks: list = dataclasses.field(default_factory=list)
    terms: Terms | None = None
    widened: int = 0
    net_bits: int = 0

    @property
    def initial_bits(self) -> int:
        """The initial bits the encoder borrowed (the top words among them): paid once per file."""
        return 32 * (self.pool_words + self.top_words - self.kept)


def initial_words(n: int) -> np.ndarray:
    """The pool: n pseudo-random uint32 words from PCG64(POOL_SEED)'s raw stream (stable across numpy
    versions), zeros replaced by 1 (a trailing zero word would be dropped by the coder)."""
    raw = np.random.PCG64(POOL_SEED).random_raw((n + 1) // 2).astype(np.uint64)
    words = np.stack([raw & np.uint64(0xFFFFFFFF), raw >> np.uint64(32)], axis=1).reshape(-1)[:n]
    words = words.astype(np.uint32)
    words[words == 0] = 1
    return words


def chunk_sizes(num_images: int, growth: int, max_batch: int) -> list[int]:
    """Images per chunk in coding order: PROBE_CHUNKS single images, then 2^(j // growth) for the j-th
    chunk after them (j = 1, 2, ...), capped at max_batch and at what is left."""
    sizes, left, j = [], num_images, 0
    while left > 0:
        size = 1 if len(sizes) < PROBE_CHUNKS else min(max_batch, 2 ** min((j := j + 1) // growth, 30))
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def plan_growth(probe: list[ChunkCost], available: float, num_left: int, max_batch: int) -> int:
    """The fastest growth (smallest doubling period) under which, by the probe's costs with margins, no
    later chunk borrows more than the stack holds above its lowest point so far (`available` bits)."""
    loan = PEAK_MARGIN * max(c.loan_per_image for c in probe)
    net = NET_MARGIN * sum(c.after - c.before for c in probe) / sum(c.size for c in probe)
    for growth in range(1, 256):
        room, ok = available, True
        for size in chunk_sizes(num_left + PROBE_CHUNKS, growth, max_batch)[PROBE_CHUNKS:]:
            if size > 1 and size * loan > room:
                ok = False
                break
            room += size * max(net, 0.0)
        if ok:
            return growth
    return 255


# ------------------------------------------------------------------------------------------ one chunk

def _encode_chunk(coder: _Coder, face: ModelFace, sched: Schedule, x: np.ndarray, terms: dict | None,
                  progress: Progress | None) -> None:
    """Codes one chunk x (B, H, W, C): the compress list of the module docstring."""
    T, V = sched.timesteps, face.model_config.vocab_size
    times, grid = grid_times(T), [2.0 ** e for e in sched.exponent]
    f = encode_values(x, V)                                                       # (B, H, W, C)
    j_prev = coder.pop_gaussian(sched.q_forward_mean(0, None, f), sched.fwd_std[0], sched.exponent[0],
                                sched.window[0], key=0)
    z_prev = j_prev * grid[0]
    logp = face.decoder_logprobs(z_prev)                                          # (B, H, W, C, V)
    coder.push_categorical(x, np.exp(logp))
    if terms is not None:
        terms["recon"] = -np.take_along_axis(logp, x[..., None].astype(np.int64), -1).sum(axis=(1, 2, 3, 4))
        terms["noise_sq"] = _sum_sq((z_prev - sched.q_forward_mean(0, None, f)) / sched.fwd_std[0])
    if progress:
        progress(len(x))
    for i in range(1, T + 1):
        j = coder.pop_gaussian(sched.q_forward_mean(i, z_prev, None), sched.fwd_std[i], sched.exponent[i],
                               sched.window[i], key=i)
        z = j * grid[i]
        mean_p = sched.p_mean(i, z, face.eps_hat(z, float(times[i])))
        coder.push_gaussian(j_prev, mean_p, sched.p_std[i - 1], sched.exponent[i - 1], sched.window[i - 1])
        if terms is not None:
            _add_step_terms(terms, sched, i, z_prev, z, f, mean_p)
            terms["noise_sq"] += _sum_sq((z - sched.q_forward_mean(i, z_prev, None)) / sched.fwd_std[i])
        if progress:
            progress(len(x))
        j_prev, z_prev = j, z
    coder.push_gaussian(j_prev, np.zeros_like(z_prev), 1.0, sched.exponent[T], sched.window[T])
    if terms is not None:
        _add_prior_terms(terms, sched, z_prev, f)


def _decode_chunk(coder: _Coder, face: ModelFace, sched: Schedule, size: int, image_shape,
                  progress: Progress | None) -> np.ndarray:
    """Decodes one chunk of `size` images: the compress list backwards, each op inverted."""
    T, V = sched.timesteps, face.model_config.vocab_size
    times, grid = grid_times(T), [2.0 ** e for e in sched.exponent]
    shape = (size, *image_shape)
    j = coder.pop_gaussian(np.zeros(shape), 1.0, sched.exponent[T], sched.window[T])
    z = j * grid[T]
    for i in range(T, 0, -1):
        mean_p = sched.p_mean(i, z, face.eps_hat(z, float(times[i])))
        j_prev = coder.pop_gaussian(mean_p, sched.p_std[i - 1], sched.exponent[i - 1], sched.window[i - 1])
        z_prev = j_prev * grid[i - 1]
        coder.push_gaussian(j, sched.q_forward_mean(i, z_prev, None), sched.fwd_std[i], sched.exponent[i],
                            sched.window[i], key=i)
        if progress:
            progress(size)
        j, z = j_prev, z_prev
    x = coder.pop_categorical(np.exp(face.decoder_logprobs(z)), shape)
    if progress:
        progress(size)
    coder.push_gaussian(j, sched.q_forward_mean(0, None, encode_values(x, V)), sched.fwd_std[0],
                        sched.exponent[0], sched.window[0], key=0)
    return x.astype(np.uint8)


def _sum_sq(a: np.ndarray) -> np.ndarray:
    return np.square(a).reshape(len(a), -1).sum(1)


def _log_ratio(z, mean_q, mean_p, var):
    """log N(z; mean_q, var) - log N(z; mean_p, var) summed per image, and the KL between the two."""
    ratio = (np.square(z - mean_p) - np.square(z - mean_q)) / (2.0 * var)
    kl = np.square(mean_q - mean_p) / (2.0 * var)
    return ratio.reshape(len(z), -1).sum(1), kl.reshape(len(z), -1).sum(1)


def _add_step_terms(terms, sched: Schedule, i, z_prev, z, f, mean_p):
    ratio, kl = _log_ratio(z_prev, sched.q_posterior_mean(i, z, f), mean_p, sched.p_std[i - 1] ** 2)
    terms["diff"] = terms.get("diff", 0.0) + ratio
    terms["diff_kl"] = terms.get("diff_kl", 0.0) + kl


def _add_prior_terms(terms, sched: Schedule, z_1, f):
    T = sched.timesteps
    var, alpha = sched.var[T], sched.alpha[T]
    log_q = -0.5 * (np.square(z_1 - alpha * f) / var + math.log(2 * math.pi * var))
    log_p = -0.5 * (np.square(z_1) + math.log(2 * math.pi))
    terms["prior"] = (log_q - log_p).reshape(len(z_1), -1).sum(1)
    terms["klz"] = 0.5 * (alpha ** 2 * np.square(f) + var - math.log(var) - 1.0).reshape(len(z_1), -1).sum(1)


# ------------------------------------------------------------------------------------------ whole streams

def schedule_for(face: ModelFace, timesteps: int, grid_bits: int) -> Schedule:
    return Schedule.build(face.gamma(grid_times(timesteps)), grid_bits)


def encode(face: ModelFace, images: np.ndarray, timesteps: int, grid_bits: int = GRID_BITS,
           max_batch: int = MAX_BATCH, progress: Progress | None = None, collect_terms: bool = False,
           top: np.ndarray | None = None) -> Stream:
    """Codes images (N, H, W, C) uint8 in [0, vocab_size) into one stream (see the module docstring).

    progress(n) is called with the images of each model call done (N (T + 1) in all). collect_terms: also
    compute the per-image Terms on the coded latents (float64, a little slower). top: uint32 words (no
    zeros) the coder starts with above its pseudo-random pool, returned by `decode` (see Stream).
    """
    top = np.zeros(0, np.uint32) if top is None else np.asarray(top, np.uint32)
    if timesteps < 1:
        raise CompressionError(f"timesteps = {timesteps}: bits-back coding needs T >= 1 steps")
    sched = schedule_for(face, timesteps, grid_bits)
    pool = 2 * int(np.prod(images.shape[1:])) + 64    # words: 64 bits/dim; the first chunk borrows about 17
    while True:
        stream = _encode_with_pool(face, sched, images, grid_bits, max_batch, pool, top, progress, collect_terms)
        if stream is not None:
            return stream
        pool *= 8                            # the pool ran dry (never seen): code again with a larger one
        progress = None


def _encode_with_pool(face, sched, images, grid_bits, max_batch, pool_words, top, progress, collect_terms):
    pool = np.concatenate([initial_words(pool_words), top])
    coder = _Coder(pool)
    start = coder.bits()
    num = len(images)
    costs, all_terms = [], []
    growth, done, sizes = 1, 0, chunk_sizes(num, 1, max_batch)
    c = 0
    while done < num:
        if c == PROBE_CHUNKS:
            lowest = min(cost.low for cost in costs)
            growth = plan_growth(costs, coder.bits() - lowest, num - done, max_batch)
            sizes = chunk_sizes(num, growth, max_batch)
        size = sizes[c]
        before = coder.bits()
        coder.low = before
        terms = {} if collect_terms else None
        _encode_chunk(coder, face, sched, images[done:done + size], terms, progress)
        costs.append(ChunkCost(size, before, coder.bits(), coder.low))
        all_terms.append(terms)
        done += size
        c += 1
    final = coder.ans.get_compressed()
    same = np.flatnonzero(final[:pool_words] != pool[:min(len(final), pool_words)])
    kept = int(same[0]) if len(same) else min(len(final), pool_words)
    if kept < 2:
        return None
    terms = None
    if collect_terms:
        terms = Terms(**{k: np.concatenate([t[k] for t in all_terms]) for k in
                         ("recon", "prior", "diff", "klz", "diff_kl", "noise_sq")})
    return Stream(timesteps=sched.timesteps, num_images=num, image_shape=tuple(images.shape[1:]),
                  grid_bits=grid_bits, max_batch=max_batch, growth=growth, pool_words=pool_words, kept=kept,
                  words=final[kept:].copy(), top_words=len(top), chunks=costs, terms=terms,
                  widened=coder.widened, net_bits=coder.bits() - start)


def decode(face: ModelFace, stream: Stream, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the images (N, H, W, C) uint8, the top words) of a Stream. CompressionError when the ops do not
    retrace an encoding (a value outside its window, invalid coder data) or the stack does not end in the
    pool the encoder began on: the stream is damaged, or was written with another model, T or numerics."""
    sched = schedule_for(face, stream.timesteps, stream.grid_bits)
    pool = initial_words(stream.pool_words)
    sizes = chunk_sizes(stream.num_images, stream.growth, stream.max_batch)
    chunks, problem = [], None
    try:
        coder = _Coder(np.concatenate([pool[:stream.kept], stream.words]))
        for size in reversed(sizes):
            chunks.append(_decode_chunk(coder, face, sched, size, stream.image_shape, progress))
        final = coder.ans.get_compressed()
        if len(final) != stream.pool_words + stream.top_words or not np.array_equal(final[:len(pool)], pool):
            problem = "the stack does not end in the coder's initial bits"
    except (CompressionError, ValueError, KeyError, OverflowError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise CompressionError(f"the compressed stream does not decode ({problem}): the data is damaged, or was "
                               f"written with another model, T or numerics")
    return np.concatenate(chunks[::-1], axis=0), final[len(pool):]


def discrete_vlb(face: ModelFace, images: np.ndarray, timesteps: int, seed: int = 0,
                 batch_size: int = 512) -> dict[str, np.ndarray]:
    """The model's discrete-time VLB with T = `timesteps` steps of images (N, H, W, C), per image in nats:
    {'recon', 'klz', 'diff'}, each (N,) float64. vdm.VDM.loss_terms (face.loss_terms, with sm_n_timesteps =
    T as run.eval_bound sets it) is evaluated at every t = i/T, i = 1..T, each with its own eps and eps_0
    from numpy's PCG64(seed), and averaged: the bound's expectation over t exactly, rather than the one
    sampled t per image of the eval mode (same expectation, far less variance)."""
    config = eval_bound(face.model_config, timesteps)[0]
    rng = np.random.Generator(np.random.PCG64(seed))
    sums = {"recon": 0.0, "klz": 0.0, "diff": 0.0}
    for i in range(1, timesteps + 1):
        parts = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            noise = Noise(t=np.full((len(x),), i / timesteps), eps=rng.standard_normal(x.shape),
                          eps_0=rng.standard_normal(x.shape))
            parts.append(face.loss_terms(config, x, noise))
        for name in sums:
            sums[name] = sums[name] + np.concatenate([p[name] for p in parts])
    return {name: value / timesteps for name, value in sums.items()}


@contextlib.contextmanager
def progress_bar(num_images: int, timesteps: int, desc: str) -> Iterator[Progress]:
    """A tqdm bar over the N (T + 1) image-steps of a compress or decompress, as a `progress` callback."""
    from tqdm import tqdm

    with tqdm(total=num_images * (timesteps + 1), desc=desc, unit="img-step", unit_scale=True) as bar:
        yield bar.update
