"""Stain normalisation of whole H&E images, before tiling.

Photos from different patients (and labs, and days) differ in stain colour far
more than tissue of one class differs in colour; a model trained on a few
patients learns those colours. Macenko et al. (ISBI 2009) estimate each
image's haematoxylin and eosin vectors in optical density and re-render the
image with a fixed reference pair, so every image is drawn in one stain.

The implementation is torchstain's numpy backend (maintained, no torch
needed); the reference matrix and concentrations are written into the spec,
so a builder's record and the query path carry the exact numbers used and
never depend on a library default. The builder and the query path make the
same call: `normalize(image, spec)` on the whole uint8 RGB image.
"""

from __future__ import annotations

import numpy as np

METHODS = ("macenko",)
# Macenko's reference (the values of the original implementation and of torchstain):
# columns H and E in optical density per RGB channel, and their 99th-percentile concentrations.
MACENKO_REFERENCE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MACENKO_MAX_CONCENTRATION = (1.9705, 1.0308)
# Pixels with optical density below `beta` in any channel are glass and do not
# enter the stain estimate; fewer stained pixels than this leave the image as it is.
MIN_STAINED_PIXELS = 1000


def spec(method: str | None) -> dict | None:
  """The JSON-able record of a named normalisation (None: no normalisation)."""
  if method is None:
    return None
  if method != "macenko":
    raise ValueError(f"stain must be one of {METHODS} or None, got {method!r}")
  return {"method": "macenko", "stain_matrix": [list(r) for r in MACENKO_REFERENCE],
          "max_concentration": list(MACENKO_MAX_CONCENTRATION), "io": 240, "alpha": 1.0, "beta": 0.15}


def normalize(image: np.ndarray, spec_: dict | None) -> np.ndarray:
  """`image` (uint8 HxWx3 RGB) re-stained as `spec_` says; the identity for None.

  An image with almost no stained pixel (glass, a blank field) has no stain to
  estimate and is returned unchanged.
  """
  if spec_ is None:
    return image
  if spec_.get("method") != "macenko":
    raise ValueError(f"unknown stain normalisation {spec_.get('method')!r} in spec {spec_}; known: {METHODS}")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"stain.normalize takes uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
  io, beta = float(spec_["io"]), float(spec_["beta"])
  od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / io)
  if np.count_nonzero(~np.any(od < beta, axis=1)) < MIN_STAINED_PIXELS:
    return image
  from torchstain.numpy.normalizers import NumpyMacenkoNormalizer  # pylint: disable=import-outside-toplevel
  normalizer = NumpyMacenkoNormalizer()
  normalizer.HERef = np.asarray(spec_["stain_matrix"], np.float64)
  normalizer.maxCRef = np.asarray(spec_["max_concentration"], np.float64)
  out, _, _ = normalizer.normalize(image, Io=io, alpha=float(spec_["alpha"]), beta=beta, stains=False)
  return out
