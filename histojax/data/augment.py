"""Host-side geometry on uint8 HWC images (cheap; colour is done on device).

All functions are pure given the numpy Generator they are handed, which Grain
derives from the pipeline seed and the element index.
"""

from __future__ import annotations

import numpy as np


def _check_size(image: np.ndarray, size: int) -> None:
  if image.shape[0] < size or image.shape[1] < size:
    raise ValueError(f"image of shape {image.shape} is smaller than input.image_size={size}")


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  _check_size(image, size)
  y = rng.integers(0, image.shape[0] - size + 1)
  x = rng.integers(0, image.shape[1] - size + 1)
  return image[y:y + size, x:x + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  _check_size(image, size)
  y = (image.shape[0] - size) // 2
  x = (image.shape[1] - size) // 2
  return image[y:y + size, x:x + size]


def random_dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One of the 8 flips/rotations, uniformly: tissue has no 'up'."""
  k = int(rng.integers(0, 8))
  if k >= 4:
    image = image[:, ::-1]
  return np.ascontiguousarray(np.rot90(image, k % 4))
