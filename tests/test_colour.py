"""Device-side colour augmentation."""

import jax
import jax.numpy as jnp
import numpy as np

from histojax.data import colour


def _tissue(n=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(60, 230, (n, size, size, 3)), jnp.uint8)


def test_identity_when_everything_is_off():
  images = _tissue()
  out = colour.augment(images, jax.random.key(0), colour.view_defaults())
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images, np.float32))


def test_hed_jitter_without_change_is_identity_and_stays_in_range():
  image = _tissue(1)[0] / 255.0
  same = colour.hed_jitter(image, jax.random.key(0), scale=0.0, shift=0.0)
  np.testing.assert_allclose(same, np.clip(image, 1 / 255, 1), atol=1e-5)
  moved = colour.hed_jitter(image, jax.random.key(0), scale=0.3, shift=0.3)
  assert float(jnp.abs(moved - image).mean()) > 0.01
  assert float(moved.min()) >= 0.0 and float(moved.max()) <= 1.0


def test_per_image_coin_flips_and_determinism():
  images = _tissue(64)
  cfg = colour.view_defaults(solarize_prob=0.5)
  out = colour.augment(images, jax.random.key(1), cfg)
  changed = np.asarray(jnp.any(jnp.abs(out - images) > 0.5, axis=(1, 2, 3)))  # above float round-off
  assert 10 < changed.sum() < 54  # about half the images, not all or none
  np.testing.assert_array_equal(out, colour.augment(images, jax.random.key(1), cfg))
  assert not np.array_equal(out, colour.augment(images, jax.random.key(2), cfg))


def test_byol_views_run_under_jit_in_range():
  view1, view2 = colour.byol_views()
  images = _tissue(8, 32)
  for cfg in (view1, view2):
    out = jax.jit(lambda x, k, c=cfg: colour.augment(x, k, c))(images, jax.random.key(3))
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0 + 1e-3
  assert view1.blur_prob == 1.0 and view2.solarize_prob == 0.2
