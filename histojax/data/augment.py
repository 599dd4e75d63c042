"""Host-side geometry on uint8 HWC images (cheap; colour is done on device).

All functions are pure given the numpy Generator they are handed, which Grain
derives from the pipeline seed and the element index.
"""

from __future__ import annotations

import numpy as np
import PIL.Image


def _check_size(image: np.ndarray, size: int) -> None:
  if image.shape[0] < size or image.shape[1] < size:
    raise ValueError(f"image of shape {image.shape} is smaller than input.image_size={size}")


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  _check_size(image, size)
  y = rng.integers(0, image.shape[0] - size + 1)
  x = rng.integers(0, image.shape[1] - size + 1)
  return image[y:y + size, x:x + size]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
  """Inception-style crop: a random area fraction and aspect ratio, resized to `size`.

  Tries `attempts` draws for a box that fits, then falls back to the largest
  centred square, as torchvision does.
  """
  h, w = image.shape[:2]
  for _ in range(attempts):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if 0 < ch <= h and 0 < cw <= w:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return _resize(image[y:y + ch, x:x + cw], size)
  side = min(h, w)
  return _resize(center_crop(image, side), size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.BILINEAR))


FILTERS = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}


def resize_short_side(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
  """The short side to `size`, the long one to int(size * long / short), as torchvision's
  Resize(int) sizes a PIL image (and filters it: PIL's antialiased `interpolation`); an image
  already that size is returned as it is, as there."""
  h, w = image.shape[:2]
  short, long = min(h, w), max(h, w)
  target = (size, int(size * long / short))
  new_h, new_w = target if h <= w else target[::-1]
  if (new_h, new_w) == (h, w):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((new_w, new_h), FILTERS[interpolation]))


def resize_square(image: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
  """Straight to size x size, the aspect ratio not kept (transformers' ViTImageProcessor)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), FILTERS[interpolation]))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  _check_size(image, size)
  y = (image.shape[0] - size) // 2
  x = (image.shape[1] - size) // 2
  return image[y:y + size, x:x + size]


def center_crop_rounded(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's CenterCrop: offsets int(round((h - size) / 2)), Python's round (half to even).
  `center_crop` floors them, one pixel apart when h - size is odd; export and search keep that
  one, so that their galleries and queries agree with the ones already built."""
  _check_size(image, size)
  y = int(round((image.shape[0] - size) / 2.0))
  x = int(round((image.shape[1] - size) / 2.0))
  return image[y:y + size, x:x + size]


def random_dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One of the 8 flips/rotations, uniformly: tissue has no 'up'."""
  k = int(rng.integers(0, 8))
  if k >= 4:
    image = image[:, ::-1]
  return np.ascontiguousarray(np.rot90(image, k % 4))
