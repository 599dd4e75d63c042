"""The CPU convolution rewrite: same values and gradients as lax, in every case the models use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from histojax import models
from histojax.models import conv as conv_lib


@pytest.fixture(autouse=True)
def matmul_gradients(monkeypatch):
  """The rewrite is the CPU default (conv.rewrite_active); set explicitly so an
  HISTOJAX_CONV=lax in the environment cannot make this compare lax with itself."""
  monkeypatch.setenv("HISTOJAX_CONV", "matmul")
  assert conv_lib.rewrite_active()

NHWC = ("NHWC", "HWIO", "NHWC")


def _both(x, w, stride, pad):
  args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)), dimension_numbers=NHWC)
  ours = lambda x, w: conv_lib.conv_general_dilated(x, w, **args)
  ref = lambda x, w: lax.conv_general_dilated(x, w, **args, precision=lax.Precision.HIGHEST)
  return ours, ref


@pytest.mark.parametrize("k,stride,cin,size", [(1, 1, 8, 9), (1, 2, 8, 9), (3, 1, 24, 8), (3, 2, 24, 9),
                                               (7, 2, 3, 16), (3, 2, 4, 7)])
def test_values_and_gradients_match_lax(k, stride, cin, size):
  r = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(r.normal(size=(3, size, size, cin)), jnp.float32)
  w = jnp.asarray(r.normal(size=(k, k, cin, 5)) * 0.2, jnp.float32)
  ours, ref = _both(x, w, stride, k // 2)
  y = ours(x, w)
  np.testing.assert_allclose(y, ref(x, w), rtol=1e-4, atol=1e-4)
  dy = jnp.asarray(r.normal(size=y.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * dy)
  got = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


def test_kernel_gradient_is_a_product_not_a_convolution():
  # The whole point: no convolution over the batch is left in the backward pass.
  x = jnp.ones((2, 8, 8, 16))
  w = jnp.ones((3, 3, 16, 4))
  ours, _ = _both(x, w, 1, 1)
  hlo = jax.jit(jax.grad(lambda w: jnp.sum(ours(x, w)))).lower(w).as_text()
  assert "convolution" not in hlo  # 3x3: kernel gradient only (the input gradient is not asked for)
  assert "dot_general" in hlo


@pytest.mark.parametrize("window,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_gradient_goes_to_the_first_maximum_like_lax(window, stride, pad):
  # After a ReLU many windows hold several equal maxima (zeros): the gradient
  # must reach exactly one of them, the one select-and-scatter picks.
  x = jnp.asarray(np.maximum(np.random.default_rng(window).normal(size=(2, 9, 10, 3)), 0), jnp.float32)
  x = x.at[0, :4, :4, :].set(1.0)  # a block of ties that are not zero
  args = ((window, window), (stride, stride), ((pad, pad), (pad, pad)))
  ours = lambda x: conv_lib.max_pool(x, *args)
  ref = lambda x: nnx.max_pool(x, *args[:1], strides=args[1], padding=args[2])
  np.testing.assert_array_equal(ours(x), ref(x))
  dy = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape), jnp.float32)
  # Overlapping windows add shares in another order: equal up to rounding, while a
  # tie sent to the wrong pixel would be off by a whole share.
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(ours(x) * dy))(x),
                             jax.grad(lambda x: jnp.sum(ref(x) * dy))(x), rtol=1e-6, atol=1e-6)


def test_unusual_convolutions_fall_back_to_lax():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))  # 2 groups
  y = conv_lib.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
  np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC,
                                                         feature_group_count=2))


def test_resnet_gradients_match_the_lax_model(monkeypatch):
  cfg = models.model_config("mixed_attention")
  cfg.depth, cfg.width, cfg.embed_dim = 18, 0.125, 8
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)

  def grads():
    model = models.build_model(cfg, seed=0)
    model.train()
    return nnx.grad(lambda m: jnp.sum(m(images)[:, 0]))(model)

  ours = grads()
  monkeypatch.setenv("HISTOJAX_CONV", "lax")  # XLA's own lowering, as on accelerators
  ref = grads()
  # Judged per leaf against the leaf's own scale: train-mode BN on a batch of 4
  # amplifies float32 summation-order noise in small elements (CI saw 4 of 1,176
  # elements of one leaf 2% off elementwise, 1.3e-4 absolute), while every leaf
  # stays within 2.2e-4 of its largest gradient (measured). A wrong tap, a tie
  # sent to the wrong pixel or a missing term is off by a whole share, i.e. by
  # 1e-2..1 of the scale, so 2e-3 still fails on those.
  for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
    path, a, b = jax.tree_util.keystr(key), np.asarray(a), np.asarray(b)
    scale = float(np.abs(b).max())
    assert scale > 0, f"{path}: zero gradient in the lax model (the test would not see errors)"
    err = float(np.abs(a - b).max()) / scale
    assert err <= 2e-3, f"{path}: off by {err:.2e} of its scale"
