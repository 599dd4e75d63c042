"""Convolutions whose gradients run as matrix products on the CPU.

XLA's CPU backend lowers the kernel gradient of a convolution (a convolution
over the batch) to a loop that runs 10-20x slower than the forward pass: on a
2-core AVX-512 host it took most of a ResNet-50 training step (see
bench/README or `python -m bench.train_step --against torch`). Matrix
products, by contrast, run at the forward's speed. So on the CPU:

- a 1x1 convolution is a matrix product over channels (after subsampling for
  stride), and autodiff's transposes of it are matrix products too;
- a k x k convolution keeps XLA's forward and input gradient, and computes the
  kernel gradient as k*k matrix products of shifted input windows with the
  output gradient (or one product of their concatenation when the input has
  few channels, as at the stem), without storing any patches between passes.

The values are the convolution's; only the order of float additions differs.
Other backends (GPU, TPU) keep `lax.conv_general_dilated` untouched: their
libraries' kernel gradients are fast. `conv_general_dilated` has lax's
signature so `nnx.Conv(conv_general_dilated=...)` takes it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_FEW_CHANNELS = 16  # below this many input channels one concatenated product beats k*k small ones


def rewrite_active() -> bool:
  """On the CPU by default; HISTOJAX_CONV=lax turns it off (XLA's own lowering, for A/B runs).

  It was opt-in for a while: training on a mesh of 8 CPU devices stopped
  matching 1 device (tests/test_methods.py: ABE's second loss 0.869 against
  0.723). The cause was the pool's backward, which matched taps against the
  forward's maximum for equality; see `_max_pool_fwd`. Fixed, it is on again.
  """
  return jax.default_backend() == "cpu" and os.environ.get("HISTOJAX_CONV", "matmul") != "lax"


def _nhwc_dims(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None:
    return False
  return lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers) == _NHWC


def _plain(strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, lhs, rhs) -> bool:
  """True for the convolutions rewritten here: 2-D, NHWC/HWIO, explicit padding, no dilation or groups."""
  ones = lambda d: d is None or all(v == 1 for v in d)
  return (lhs.ndim == 4 and groups == 1 and ones(lhs_dilation) and ones(rhs_dilation)
          and not isinstance(padding, str) and _nhwc_dims(dimension_numbers, 4))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`, with matrix-product gradients on the CPU for plain 2-D convolutions."""
  lax_conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                               lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                               dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                               precision=precision, **kwargs)
  if (not rewrite_active() or any(v is not None for v in kwargs.values()) or
      not _plain(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, lhs, rhs)):
    return lax_conv(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if rhs.shape[:2] == (1, 1):
    return _pointwise(lhs, rhs, strides, padding, precision)
  return _spatial(lhs, rhs, strides, padding, precision)


def _pointwise(x, w, strides, padding, precision):
  """1x1 convolution as a product over channels; autodiff's transposes are products too."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0))) if any(p != (0, 0) for p in padding) else x
  x = x[:, ::strides[0], ::strides[1], :]
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def _windows(x, kernel_hw, strides, padding, out_hw, pad_value=0):
  """The input window under each kernel tap: k*k arrays shaped like the output, channels of x."""
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=pad_value)
  (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
  return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def kernel_gradient(x, dy, kernel_hw, strides, padding, precision=None):
  """d(loss)/d(kernel) [kh, kw, cin, cout] of an NHWC convolution, as matrix products."""
  cin, cout = x.shape[-1], dy.shape[-1]
  windows = _windows(x, kernel_hw, strides, padding, dy.shape[1:3])
  flat_dy = dy.reshape(-1, cout)
  over_pixels = (((0,), (0,)), ((), ()))
  if cin < _FEW_CHANNELS:
    stacked = jnp.concatenate(windows, axis=-1).reshape(-1, len(windows) * cin)
    grad = lax.dot_general(stacked, flat_dy, over_pixels, precision=precision)
  else:
    grad = jnp.stack([lax.dot_general(win.reshape(-1, cin), flat_dy, over_pixels, precision=precision)
                      for win in windows])
  return grad.reshape(*kernel_hw, cin, cout).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _spatial(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _spatial_fwd(x, w, strides, padding, precision):
  return _spatial(x, w, strides, padding, precision), (x, w)


def _spatial_bwd(strides, padding, precision, residuals, dy):
  x, w = residuals
  # XLA's input gradient (a transposed convolution) is as fast as its forward: keep it.
  _, input_vjp = jax.vjp(lambda x_: lax.conv_general_dilated(
      x_, w, strides, padding, dimension_numbers=_NHWC, precision=precision), x)
  dx, = input_vjp(dy)
  return dx, kernel_gradient(x, dy, w.shape[:2], strides, padding, precision)


_spatial.defvjp(_spatial_fwd, _spatial_bwd)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """`nnx.max_pool` on NHWC, whose gradient on the CPU is k*k masked pads instead of select-and-scatter.

  XLA's CPU select-and-scatter took 10 s for the ResNet stem's pool on a
  batch of 32 at 224 px (half the training step); this backward pass
  routes each output's gradient to the first maximum of its window in
  row-major order, exactly as select-and-scatter does (ties after a ReLU
  are common), at memory speed.
  """
  window, strides = tuple(window), tuple(strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if not rewrite_active() or x.ndim != 4:
    return _reduce_max(x, window, strides, padding)
  return _max_pool(x, window, strides, padding)


def _reduce_max(x, window, strides, padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return _reduce_max(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  # The maximum and the tap that holds it come from one running comparison,
  # never from testing taps for equality with a maximum computed elsewhere: XLA
  # may recompute the pool's input (e.g. BN + ReLU) in two fusions with
  # different rounding, and then no tap equals `out` and the window's gradient
  # is lost (seen on an 8-device CPU mesh: stem gradients 5% off).
  # Strictly greater keeps the first maximum in row-major order, as
  # select-and-scatter does (ties after a ReLU are common).
  out_hw = tuple((x.shape[d + 1] + sum(padding[d]) - window[d]) // strides[d] + 1 for d in range(2))
  taps = _windows(x, window, strides, padding, out_hw, pad_value=-jnp.inf)
  out, first = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, tap in enumerate(taps[1:], start=1):
    greater = tap > out
    out, first = jnp.where(greater, tap, out), jnp.where(greater, jnp.int8(t), first)
  return out, (x.shape, first)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  x_shape, first = residuals
  (ho, wo), (sh, sw) = first.shape[1:3], strides
  padded_hw = (x_shape[1] + sum(padding[0]), x_shape[2] + sum(padding[1]))
  # The input splits into sh*sw phases (pixels with the same row and column
  # remainder); tap (i, j) feeds phase (i % sh, j % sw) at offset (i // sh, j // sw),
  # so every tap's share is a plain shifted pad and one interleave puts them back.
  hq, wq = -(-padded_hw[0] // sh), -(-padded_hw[1] // sw)
  phases = [[jnp.zeros((x_shape[0], hq, wq, x_shape[3]), dy.dtype) for _ in range(sw)] for _ in range(sh)]
  taps = [(i, j) for i in range(window[0]) for j in range(window[1])]
  zero = jnp.zeros((), dy.dtype)
  for t, (i, j) in enumerate(taps):
    (di, a), (dj, b) = divmod(i, sh), divmod(j, sw)
    phases[a][b] = phases[a][b] + jnp.pad(jnp.where(first == t, dy, zero),
                                          ((0, 0), (di, hq - di - ho), (dj, wq - dj - wo), (0, 0)))
  dxp = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [N, hq, sh, wq, sw, C]
  dxp = dxp.reshape(x_shape[0], hq * sh, wq * sw, x_shape[3])
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x_shape[1], left:left + x_shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
