"""Sample grids as PNG: integer images in [0, vocab_size) tiled with a 1-pixel border."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vdm_common.workdir import atomic_write_bytes

BORDER_VALUE = 255      # white lines between tiles (and in empty slots of the last row)
MIN_GRID_WIDTH = 256    # small images (8x8 digits) are upscaled until the grid is at least this wide


def image_grid(images: np.ndarray, vocab_size: int, ncols: int | None = None) -> np.ndarray:
    """Tiles N images (N, H, W, C) with values in [0, vocab_size) into one uint8 image (H', W', C).

    Values are rescaled to [0, 255] as value * 255 // (vocab_size - 1). Image k goes to row k // ncols,
    column k % ncols (ncols defaults to ceil(sqrt(N))). Each image is upscaled by the smallest integer
    nearest-neighbour factor s that makes the grid at least MIN_GRID_WIDTH pixels wide; tiles are then
    (H s, W s) and separated (and surrounded) by 1-pixel borders of BORDER_VALUE. C is 1 or 3.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array with C in (1, 3); got {images.shape}")
    if not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"images must hold integers in [0, vocab_size), got dtype {images.dtype}")
    if vocab_size < 2 or images.min() < 0 or images.max() >= vocab_size:
        raise ValueError(f"images must hold values in [0, {vocab_size}); got [{images.min()}, {images.max()}]")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    scale = max(1, math.ceil((MIN_GRID_WIDTH - 1 - ncols) / (ncols * w)))
    pixels = (images.astype(np.int64) * 255 // (vocab_size - 1)).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)                     # (N, H s, W s, C)
    th, tw = h * scale, w * scale
    grid = np.full((nrows * (th + 1) + 1, ncols * (tw + 1) + 1, c), BORDER_VALUE, np.uint8)
    for k in range(n):
        y, x = 1 + (k // ncols) * (th + 1), 1 + (k % ncols) * (tw + 1)
        grid[y:y + th, x:x + tw] = pixels[k]
    return grid


def png_grid(images: np.ndarray, vocab_size: int, ncols: int | None = None) -> bytes:
    """`image_grid(images, vocab_size, ncols)` encoded as PNG bytes."""
    grid = image_grid(images, vocab_size, ncols)
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image_grid(path: str | os.PathLike, images: np.ndarray, vocab_size: int,
                    ncols: int | None = None) -> Path:
    """Writes `png_grid(images, vocab_size, ncols)` to `path`, atomically; creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_grid(images, vocab_size, ncols))
    return path
