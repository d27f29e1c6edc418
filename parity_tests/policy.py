"""The precision policy of every cross-backend comparison ("parity mode").

    JAX    jax_enable_x64 on (float64 cases need it; float32 cases pass float32 arrays explicitly, and the
           harness asserts the dtype of every JAX result), jax_default_matmul_precision 'highest' (no
           bf16 / TF32 passes for float32 matmuls and convolutions on TPU / GPU).
    torch  TF32 off for matmuls and cuDNN convolutions, float32 matmul precision 'highest'; one intra-op
           thread: the tensors are tiny, and on a 2-core CI runner torch's thread pool fights XLA's (each
           torch op became ~100x slower), and one thread also fixes the order of torch's CPU reductions.

`parity_mode()` sets all of it and restores the previous values on exit, so the parity suite can share a
pytest process with the per-backend unit tests without changing their defaults.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import torch


@contextlib.contextmanager
def parity_mode() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.get_num_threads())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(1)
    try:
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
        torch.set_num_threads(saved[3])
