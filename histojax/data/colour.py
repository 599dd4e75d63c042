"""Device-side colour augmentation, inside the jitted step, from the step rng.

The host does cheap geometry (crop, flip, rot90); colour work is dense
per-pixel arithmetic that accelerators do for free, so it runs here on the
global batch. Every transform is applied per image with its own key and its
own coin flip, so one batch mixes augmented and untouched images.

Stain variation is what separates histology from natural images: besides
the usual colour jitter, `hed_jitter` perturbs the haematoxylin, eosin and
DAB concentrations (Tellez et al., 2018) in optical-density space, which is
how real staining batches differ.

Images enter as uint8 or float in [0, 255] and leave as float32 in [0, 255]
(the model normalises them); work is done in [0, 1].
"""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Ruifrok & Johnston (2001) stain vectors: rows H, E, DAB; unit-normalised.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def view_defaults(**overrides) -> ml_collections.ConfigDict:
  """One view's augmentation; every probability 0 means the identity."""
  cfg = ml_collections.ConfigDict(dict(
      jitter_prob=0.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
      hed_prob=0.0, hed_scale=0.05, hed_shift=0.05,
      grayscale_prob=0.0, blur_prob=0.0, blur_sigma_min=0.1, blur_sigma_max=2.0,
      solarize_prob=0.0))
  cfg.update(overrides)
  return cfg


def byol_views() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """BYOL's asymmetric pair (Grill et al., 2020, table 6), plus HED jitter for stain.

  View 1 is always blurred and never solarised; view 2 is rarely blurred and
  sometimes solarised. Hue jitter is kept small: hue carries stain identity.
  """
  common = dict(jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.05,
                hed_prob=0.5, grayscale_prob=0.2)
  return (view_defaults(**common, blur_prob=1.0, solarize_prob=0.0),
          view_defaults(**common, blur_prob=0.1, solarize_prob=0.2))


def is_identity(cfg: ml_collections.ConfigDict) -> bool:
  return not any(cfg[k] > 0 for k in ("jitter_prob", "hed_prob", "grayscale_prob", "blur_prob", "solarize_prob"))


def hed_jitter(image, key, scale: float, shift: float):
  """Scales and shifts each stain's optical density by a per-image random amount."""
  k1, k2 = jax.random.split(key)
  od = -jnp.log(jnp.clip(image, 1.0 / 255, 1.0))
  hed = od @ _HED_FROM_RGB
  alpha = jax.random.uniform(k1, (3,), minval=1 - scale, maxval=1 + scale)
  beta = jax.random.uniform(k2, (3,), minval=-shift, maxval=shift)
  return jnp.clip(jnp.exp(-((hed * alpha + beta) @ _RGB_FROM_HED)), 0.0, 1.0)


def colour_jitter(image, key, cfg):
  """Brightness, contrast, saturation, hue, in that fixed order."""
  kb, kc, ks, kh = jax.random.split(key, 4)
  image = pix.random_brightness(kb, image, cfg.brightness)
  image = pix.random_contrast(kc, image, 1 - cfg.contrast, 1 + cfg.contrast)
  image = pix.random_saturation(ks, image, 1 - cfg.saturation, 1 + cfg.saturation)
  image = pix.random_hue(kh, image, cfg.hue)
  return jnp.clip(image, 0.0, 1.0)


def _blur(image, key, cfg):
  sigma = jax.random.uniform(key, (), minval=cfg.blur_sigma_min, maxval=cfg.blur_sigma_max)
  # A kernel of about a tenth of the image side, as in SimCLR/BYOL.
  kernel = max(3, (image.shape[0] // 10) | 1)
  return pix.gaussian_blur(image, sigma, kernel)


def _grayscale(image, key, cfg):
  del key, cfg
  return jnp.broadcast_to(pix.rgb_to_grayscale(image, keep_dims=True), image.shape)


def _solarize(image, key, cfg):
  del key, cfg
  return pix.solarize(image, 0.5)


def _augment_one(image, key, cfg):
  steps = [("jitter_prob", lambda im, k: colour_jitter(im, k, cfg)),
           ("hed_prob", lambda im, k: hed_jitter(im, k, cfg.hed_scale, cfg.hed_shift)),
           ("grayscale_prob", lambda im, k: _grayscale(im, k, cfg)),
           ("blur_prob", lambda im, k: _blur(im, k, cfg)),
           ("solarize_prob", lambda im, k: _solarize(im, k, cfg))]
  for prob_field, transform in steps:
    if cfg[prob_field] <= 0:
      continue  # static: a disabled transform costs nothing
    key, coin_key, op_key = jax.random.split(key, 3)
    apply = jax.random.uniform(coin_key) < cfg[prob_field]
    image = jnp.where(apply, transform(image, op_key), image)
  return image


def augment(images, key: jax.Array, cfg: ml_collections.ConfigDict):
  """Per-image colour augmentation of a [B, H, W, 3] batch in [0, 255]."""
  images = images.astype(jnp.float32)
  if is_identity(cfg):
    return images
  keys = jax.random.split(key, images.shape[0])
  out = jax.vmap(lambda im, k: _augment_one(im, k, cfg))(images / 255.0, keys)
  return out * 255.0
