"""Stain normalisation of whole H&E images, before tiling.

Photos from different patients (and labs, and days) differ in stain colour far
more than tissue of one class differs in colour; a model trained on a few
patients learns those colours. Macenko et al. (ISBI 2009) estimate each
image's haematoxylin and eosin vectors in optical density and re-render the
image with a fixed reference pair, so every image is drawn in one stain.

Reinhard et al. (2001) match instead each image's mean and spread of lightness
and the two colour axes (CIE L*a*b*) to a reference: no stain model, only the
image's global colour statistics. Here the statistics are those of the
tissue pixels only (optical density above Macenko's glass threshold in some
channel), so the share of glass in a photo does not move them.

The colour conversions and Macenko are torchstain's numpy backend
(maintained, no torch needed); every reference number is written into the spec,
so a builder's record and the query path carry the exact numbers used and
never depend on a library default. The builder and the query path make the
same call: `normalize(image, spec)` on the whole uint8 RGB image.
"""

from __future__ import annotations

import numpy as np
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
from torchstain.numpy.utils.lab2rgb import lab2rgb
from torchstain.numpy.utils.rgb2lab import rgb2lab
from torchstain.numpy.utils.split import lab_merge, lab_split

METHODS = ("macenko", "reinhard")
# Macenko's reference (the values of the original implementation and of torchstain):
# columns H and E in optical density per RGB channel, and their 99th-percentile concentrations.
MACENKO_REFERENCE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_CONCENTRATION = (1.9705, 1.0308)
# Pixels that `stained_pixels` leaves out (optical density below `beta`) do not enter the
# estimate; fewer stained pixels than this leave the image as it is.
MIN_STAINED_PIXELS = 1000
# Reinhard's reference: L* (0-100), a*, b* mean and standard deviation over the tissue pixels,
# the mean of those of the 140 BACH training photos (001-035 per class, patient-aware split).
REINHARD_MEAN = (65.82, 24.22, -28.42)
REINHARD_STD = (11.78, 8.35, 9.05)


def spec(method: str | None) -> dict | None:
  """The JSON-able record of a named normalisation (None: no normalisation)."""
  if method is None:
    return None
  if method not in METHODS:
    raise ValueError(f"stain must be one of {METHODS} or None, got {method!r}")
  if method == "reinhard":
    return {"method": "reinhard", "lab_mean": list(REINHARD_MEAN), "lab_std": list(REINHARD_STD), "io": 240,
            "beta": 0.15}
  return {"method": "macenko", "stain_matrix": [list(r) for r in MACENKO_REFERENCE],
          "max_concentration": list(MACENKO_MAX_CONCENTRATION), "io": 240, "alpha": 1.0, "beta": 0.15}


def normalize(image: np.ndarray, spec_: dict | None) -> np.ndarray:
  """`image` (uint8 HxWx3 RGB) re-stained as `spec_` says; the identity for None.

  An image with almost no stained pixel (glass, a blank field) has no stain to
  estimate and is returned unchanged.
  """
  if spec_ is None:
    return image
  if spec_.get("method") not in METHODS:
    raise ValueError(f"unknown stain normalisation {spec_.get('method')!r} in spec {spec_}; known: {METHODS}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"stain.normalize takes uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
  stained = stained_pixels(image, spec_)
  if np.count_nonzero(stained) < MIN_STAINED_PIXELS:
    return image
  if spec_["method"] == "reinhard":
    return _reinhard(image, stained, spec_)
  io, beta = float(spec_["io"]), float(spec_["beta"])
  normalizer = NumpyMacenkoNormalizer()
  normalizer.HERef = np.asarray(spec_["stain_matrix"], np.float64)
  normalizer.maxCRef = np.asarray(spec_["max_concentration"], np.float64)
  out, _, _ = normalizer.normalize(image, Io=io, alpha=float(spec_["alpha"]), beta=beta, stains=False)
  return out


def stained_pixels(image: np.ndarray, spec_: dict) -> np.ndarray:
  """[h*w] bool, the pixels a method estimates from. Macenko: optical density at least `beta`
  in every channel (its stain vectors come from strongly stained pixels). Reinhard: in some
  channel, so pale eosin-only stroma (red-channel density near 0) counts as tissue and only
  glass is left out."""
  od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / float(spec_["io"]))
  reduce = np.any if spec_["method"] == "reinhard" else np.all
  return reduce(od >= float(spec_["beta"]), axis=1)


def lab_statistics(image: np.ndarray, stained: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(L*a*b* of every pixel [h*w, 3], mean and standard deviation over the `stained` ones)."""
  lab = np.stack(lab_split(rgb2lab(image.reshape(-1, 3).astype(np.float32) / 255)), axis=-1)
  return lab, lab[stained].mean(0), lab[stained].std(0)


def _reinhard(image: np.ndarray, stained: np.ndarray, spec_: dict) -> np.ndarray:
  lab, mean, std = lab_statistics(image, stained)
  target_mean, target_std = np.asarray(spec_["lab_mean"], np.float32), np.asarray(spec_["lab_std"], np.float32)
  lab = (lab - mean) / np.maximum(std, 1e-6) * target_std + target_mean
  rgb = lab2rgb(lab_merge(*(lab[:, c] for c in range(3))))
  return np.round(rgb * 255).astype(np.uint8).reshape(image.shape)
