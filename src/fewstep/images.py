"""Image conversions and sample grids (PNG)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep import storage
from fewstep.errors import UserError


class ImageError(UserError, ValueError):
    """An image file that cannot be read, or none given."""


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows, cols) mosaic with a ``pad``-pixel white border."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    out = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = im
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def save_grid(images: np.ndarray | torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> None:
    if isinstance(images, torch.Tensor):
        images = to_uint8(images)
    buf = io.BytesIO()
    Image.fromarray(grid(images, nrow, scale=scale)).save(buf, format="PNG")
    storage.atomic_write_bytes(path, buf.getvalue())


def load_images(paths: list[str | Path], size: int) -> torch.Tensor:
    """Image files (any PIL format, local or fsspec URL) -> (N, 3, size, size) in [-1, 1]; an image of
    another size is resized (bicubic) to ``size`` x ``size``."""
    out = []
    for p in paths:
        with storage.open_read(p) as f:
            try:
                im = Image.open(io.BytesIO(f.read())).convert("RGB")
            except Exception as e:  # PIL raises several types for unreadable files
                raise ImageError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    if not out:
        raise ImageError("no image files given")
    return from_uint8(np.stack(out))
