"""Resampling a ViT's position-embedding grid to another input size, as each reference does.

Published ViTs are run at input sizes other than the one they were trained at
(Kaiko's ViT-L/14 is stored at 518 px and used at 224), and every reference
library resamples the learned grid with `torch.nn.functional.interpolate`, but
not all the same way:

  bicubic_antialias  timm (`resample_abs_pos_embed`, `dynamic_img_size`) and
                     transformers' Dinov2WithRegisters: bicubic with
                     antialias, which below 1x widens the Keys (a = -0.5)
                     kernel by the scale and renormalises it at the borders.
  bicubic            transformers' Dinov2 and ViT (`interpolate_pos_encoding`,
                     transformers >= 4.45): plain bicubic (a = -0.75, edge
                     samples clamped) to an output size.
  bicubic_offset     DINOv2's original code and transformers < 4.45: plain
                     bicubic with `scale_factor = (n + 0.1) / N`, so the source
                     positions follow the offset scale, not n / N.

`jax.image.resize(antialias=True)` computes the first exactly; its cubic kernel
is a = -0.5 everywhere, so the plain rules are written out here as the two 1-D
weight matrices torch's CPU kernel uses, computed in numpy once per shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("bicubic_antialias", "bicubic", "bicubic_offset")
_OFFSET = 0.1  # DINOv2's "small number to avoid floating point error" (facebookresearch/dino#8)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel, as torch's upsample kernels write it."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _plain_weights(n_in: int, n_out: int, scale: float) -> np.ndarray:
  """torch's bicubic without antialias (align_corners=False): 4 taps at floor(src) - 1 ... + 2,
  indices clamped to the edge, source position scale * (i + 0.5) - 0.5."""
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5
    base = min(math.floor(src), n_in - 1)
    t = min(max(src - base, 0.0), 1.0)
    taps = _keys_cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
    for k, tap in enumerate(taps):
      w[i, min(max(base - 1 + k, 0), n_in - 1)] += tap
  return w


@functools.lru_cache(maxsize=64)
def weights(n_in: int, n_out: int, rule: str) -> np.ndarray:
  """[n_out, n_in] float32 for the plain rules: resampled = weights @ grid along one axis."""
  if rule == "bicubic":
    w = _plain_weights(n_in, n_out, n_in / n_out)
  elif rule == "bicubic_offset":
    # F.interpolate(scale_factor=s) makes floor(N * s) outputs and maps positions by 1 / s.
    factor = (n_out + _OFFSET) / n_in
    if math.floor(n_in * factor) != n_out:
      raise ValueError(f"bicubic_offset cannot make {n_out} positions from {n_in}")
    w = _plain_weights(n_in, n_out, 1.0 / factor)
  else:
    raise ValueError(f"model.resample must be one of {RULES}, got {rule!r}")
  return w.astype(np.float32)


def resample_grid(grid, size: tuple[int, int], rule: str):
  """grid [B, H, W, D] -> [B, h, w, D] by `rule`, in float32 (as every reference does)."""
  if rule not in RULES:
    raise ValueError(f"model.resample must be one of {RULES}, got {rule!r}")
  b, h_in, w_in, d = grid.shape
  grid = grid.astype(jnp.float32)
  if rule == "bicubic_antialias":
    # jax.image.resize's antialiased cubic is torch's (Keys a=-0.5 widened by the downscale,
    # renormalised at the borders): equal to F.interpolate(antialias=True) within 2e-6 (tests).
    return jax.image.resize(grid, (b, *size, d), "bicubic", antialias=True)
  wh = jnp.asarray(weights(h_in, size[0], rule))
  ww = jnp.asarray(weights(w_in, size[1], rule))
  return jnp.einsum("ih,bhwd,jw->bijd", wh, grid, ww, precision="highest")
