"""PNG grids of samples, enlarged, with a title and optional row labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, *, ncols: int = 10, scale: int = 4, pad: int = 2,
               title: str = "", row_labels: list[str] | None = None) -> Image.Image:
    """Tile ``(N, C, H, W)`` images in [0, 1] into one enlarged RGB picture."""
    n, c, h, w = images.shape
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    cell_h, cell_w = h * scale + pad, w * scale + pad
    top = 16 if title else 0
    left = 18 if row_labels else 0
    canvas = Image.new("RGB", (left + ncols * cell_w + pad, top + nrows * cell_h + pad), "white")
    pixels = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    for i in range(n):
        tile = pixels[i, 0] if c == 1 else pixels[i].transpose(1, 2, 0)
        img = Image.fromarray(tile).convert("RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST)
        r, col = divmod(i, ncols)
        canvas.paste(img, (left + pad + col * cell_w, top + pad + r * cell_h))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((left + pad, 2), title, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((3, top + pad + r * cell_h + cell_h // 2 - 6), label, fill="black")
    return canvas


def save_grid(images: np.ndarray, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, **kwargs).save(path)  # type: ignore[arg-type]
    return path
