"""Paints deterministic H&E-like tissue images for the smoke dataset.

Tissue is drawn as stain *concentration* maps (haematoxylin for nuclei, eosin
for cytoplasm and stroma) and turned into RGB by the Beer-Lambert law with the
Ruifrok-Johnston H&E stain vectors, so colours, overlaps and saturation behave
like a real brightfield photo rather than flat paint.

Each class differs in nuclear density, size, shape, arrangement and stain
balance; every source image also gets its own stain jitter, as slides from
different batches do. This is a smoke dataset for tests and the quickstart,
not a substitute for real tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import draw

# Optical density per unit concentration (Ruifrok & Johnston, 2001), rows are
# haematoxylin and eosin, columns are R, G, B.
_STAIN_OD = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], np.float32)

CLASS_NAMES = ("adipose", "stroma", "lymphocytes", "tumour", "gland", "necrosis")


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  """Zero-mean, unit-std, spatially correlated noise."""
  field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
  return (field - field.mean()) / (field.std() + 1e-8)


def _nuclei(rng, shape, centres, radius, elongation, angle, strength, irregular):
  """Haematoxylin map of elliptical nuclei with a darker rim (chromatin)."""
  h = np.zeros(shape, np.float32)
  for (cy, cx), r, e, a, s in zip(centres, radius, elongation, angle, strength):
    r_minor = max(r / e, 1.0)
    rr, cc = draw.ellipse(cy, cx, r, r_minor, shape=shape, rotation=a)
    if irregular:
      keep = rng.random(rr.shape[0]) > 0.08  # ragged, pleomorphic outline
      rr, cc = rr[keep], cc[keep]
    h[rr, cc] = np.maximum(h[rr, cc], s)
    rr, cc = draw.ellipse_perimeter(int(cy), int(cx), int(r), int(r_minor), orientation=-a, shape=shape)  # clockwise, unlike `ellipse`
    h[rr, cc] = np.maximum(h[rr, cc], 1.3 * s)
  return h


def _fibres(rng, size, count, angle_mean, angle_spread, strength):
  """Eosin streaks: collagen fibres, roughly parallel within a region."""
  e = np.zeros((size, size), np.float32)
  for _ in range(count):
    a = angle_mean + rng.normal(0.0, angle_spread)
    cy, cx = rng.uniform(0, size, 2)
    half = rng.uniform(0.2, 0.6) * size
    r0, c0 = cy - half * np.sin(a), cx - half * np.cos(a)
    r1, c1 = cy + half * np.sin(a), cx + half * np.cos(a)
    rr, cc, val = draw.line_aa(int(r0), int(c0), int(r1), int(c1))
    ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    e[rr[ok], cc[ok]] = np.maximum(e[rr[ok], cc[ok]], strength * val[ok])
  return ndimage.gaussian_filter(e, 0.7)


def _random_centres(rng, size, n):
  return rng.uniform(0, size, (n, 2))


def _ring_centres(rng, size, n_rings, ring_radius, per_ring):
  """Nuclei around gland lumens; returns (nuclei centres, lumen centres)."""
  lumens = rng.uniform(ring_radius, size - ring_radius, (n_rings, 2))
  centres = []
  for cy, cx in lumens:
    angles = np.linspace(0, 2 * np.pi, per_ring, endpoint=False) + rng.uniform(0, 1)
    r = ring_radius * rng.uniform(0.9, 1.1, per_ring)
    centres.append(np.stack([cy + r * np.sin(angles), cx + r * np.cos(angles)], 1))
  return np.concatenate(centres), lumens


def _clear_discs(shape, centres, radius):
  """Mask of empty space (fat vacuoles, gland lumens)."""
  mask = np.zeros(shape, bool)
  for (cy, cx), r in zip(centres, np.broadcast_to(radius, len(centres))):
    rr, cc = draw.disk((cy, cx), r, shape=shape)
    mask[rr, cc] = True
  return mask


def _class_maps(label: int, rng: np.random.Generator, size: int):
  """Haematoxylin and eosin concentration maps for one class."""
  shape = (size, size)
  area = size * size / 256.0**2  # densities below are per 256x256 px
  eosin = 0.55 + 0.12 * _smooth_noise(rng, size, 6)
  hema = np.zeros(shape, np.float32)
  name = CLASS_NAMES[label]
  if name == "adipose":
    n = int(rng.integers(10, 16) * area) + 1
    centres = _random_centres(rng, size, n)
    vacuoles = _clear_discs(shape, centres, rng.uniform(22, 34, n))
    eosin = np.where(vacuoles, 0.02, eosin * 0.8)
    k = int(4 * area) + 1
    hema = _nuclei(rng, shape, _random_centres(rng, size, k), rng.uniform(3, 4, k),
                   np.full(k, 2.5), rng.uniform(0, np.pi, k), np.full(k, 0.8), False)
    hema = np.where(vacuoles, 0.0, hema)
  elif name == "stroma":
    angle = rng.uniform(0, np.pi)
    eosin = eosin + _fibres(rng, size, int(70 * area) + 4, angle, 0.12, 0.6)
    k = int(rng.integers(25, 40) * area) + 2
    hema = _nuclei(rng, shape, _random_centres(rng, size, k), rng.uniform(5, 8, k),
                   rng.uniform(3.0, 4.5, k), np.full(k, -angle) + rng.normal(0, 0.1, k),
                   rng.uniform(0.7, 1.0, k), False)
  elif name == "lymphocytes":
    k = int(rng.integers(380, 480) * area) + 8
    hema = _nuclei(rng, shape, _random_centres(rng, size, k), rng.uniform(3.0, 4.2, k),
                   rng.uniform(1.0, 1.2, k), rng.uniform(0, np.pi, k), rng.uniform(1.2, 1.6, k), False)
    eosin = eosin * 0.7
  elif name == "tumour":
    k = int(rng.integers(110, 150) * area) + 4
    # Crowded clusters: centres drawn around a few nests.
    nests = _random_centres(rng, size, 5)
    centres = nests[rng.integers(0, 5, k)] + rng.normal(0, size / 7, (k, 2))
    hema = _nuclei(rng, shape, centres, rng.uniform(6, 11, k), rng.uniform(1.0, 1.8, k),
                   rng.uniform(0, np.pi, k), rng.uniform(0.7, 1.1, k), True)
    eosin = eosin * 0.85 + 0.1
  elif name == "gland":
    n_rings = int(rng.integers(3, 5) * area) + 1
    centres, lumens = _ring_centres(rng, size, n_rings, rng.uniform(24, 32), 22)
    lumen = _clear_discs(shape, lumens, 18)
    k = len(centres)
    hema = _nuclei(rng, shape, centres, rng.uniform(4, 5.5, k), rng.uniform(1.6, 2.2, k),
                   rng.uniform(0, np.pi, k), rng.uniform(0.9, 1.2, k), False)
    eosin = np.where(lumen, 0.03, eosin)
  elif name == "necrosis":
    k = int(rng.integers(250, 350) * area) + 8
    hema = _nuclei(rng, shape, _random_centres(rng, size, k), rng.uniform(1.0, 2.2, k),
                   np.ones(k), np.zeros(k), rng.uniform(0.6, 1.3, k), True)
    hema = ndimage.gaussian_filter(hema, 0.8)
    eosin = 0.35 + 0.18 * _smooth_noise(rng, size, 3)
  else:
    raise ValueError(f"unknown synthetic class {label}")
  return hema, np.clip(eosin, 0.0, None)


def paint_tissue(label: int, seed: int, size: int = 256) -> np.ndarray:
  """Returns one HxWx3 uint8 H&E-like image of class `label`.

  The same (label, seed, size) always gives the same pixels.
  """
  rng = np.random.default_rng([label, seed, size])
  hema, eosin = _class_maps(label, rng, size)
  # Per-slide stain jitter: staining strength and hue drift a little per batch.
  stain = _STAIN_OD * rng.uniform(0.85, 1.15, (2, 1)) + rng.normal(0, 0.03, (2, 3))
  hema = ndimage.gaussian_filter(hema, 0.6) * rng.uniform(0.9, 1.1)
  od = hema[..., None] * stain[0] + eosin[..., None] * stain[1]
  od += 0.02 * rng.standard_normal(od.shape)  # sensor noise
  rgb = 255.0 * np.exp(-np.clip(od, 0.0, None))
  return np.clip(rgb, 0, 255).astype(np.uint8)
