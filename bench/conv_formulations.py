"""A 3x3 convolution's forward and kernel gradient on the CPU: the formulations histojax uses
against others.

    python -m bench.conv_formulations [--reps 15] [--out FILE]

`bench.profile_step` attributes about a quarter of the `:cpu` step to the copies of input windows
that `histojax.models.conv.kernel_gradient` feeds its k*k matrix products. This times, per layer
shape of the `:cpu` ResNet (batch 32, 112 px: stages at 28, 14, 7, 4 px) and one 224 px stage-1
layer, ways to compute the same gradient that copy less or differently:

- `windows` (histojax's): one product per tap of the shifted window [pixels, cin] with dy;
- `im2col`: the taps concatenated on channels, one product [pixels, 9 cin] x [pixels, cout];
- `flat_offset`: padded input and zero-padded dy flattened over (n, h, w), so each tap's window is
  a contiguous row range at offset i * width + j (no strided copy; more rows: the padding);
- `channels_first`: the input transposed once to [cin, pixels], windows cut there;
- `dy_transposed`: dy transposed once, each product [cout, pixels] x [pixels, cin];
- `lax`: XLA's own kernel gradient (`jax.vjp` of `lax.conv_general_dilated`).

For the forward, XLA's convolution (`lax`, what histojax runs) against `im2col` (one product of
the concatenated taps with the reshaped kernel) and `taps` (one product per tap, summed).

All agree with the first formulation to float rounding (the JSON has the largest relative
difference).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from bench import common
from histojax.models import conv

OVER_PIXELS = (((0,), (0,)), ((), ()))
LAYERS = ((32, 28, 32), (32, 14, 64), (32, 7, 128), (32, 4, 256), (32, 56, 64))  # batch, px, channels


def windows(x, dy, pad):
  return conv.kernel_gradient(x, dy, (3, 3), (1, 1), pad)


def im2col(x, dy, pad):
  cin, cout = x.shape[-1], dy.shape[-1]
  taps = jnp.concatenate(conv._windows(x, (3, 3), (1, 1), pad, dy.shape[1:3]), axis=-1)
  return lax.dot_general(taps.reshape(-1, 9 * cin), dy.reshape(-1, cout), OVER_PIXELS).reshape(3, 3, cin, cout)


def flat_offset(x, dy, pad):
  cin, cout = x.shape[-1], dy.shape[-1]
  xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
  (hp, wp), (ho, wo) = xp.shape[1:3], dy.shape[1:3]
  rows = xp.reshape(-1, cin)
  # dy is zero where a window would wrap into the next row or image, so those rows add nothing.
  length = rows.shape[0] - (2 * wp + 2)
  g = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(-1, cout)[:length]
  return jnp.stack([lax.dot_general(lax.slice_in_dim(rows, i * wp + j, i * wp + j + length), g, OVER_PIXELS)
                    for i in range(3) for j in range(3)]).reshape(3, 3, cin, cout)


def channels_first(x, dy, pad):
  cin, cout = x.shape[-1], dy.shape[-1]
  ho, wo = dy.shape[1:3]
  xt = jnp.transpose(jnp.pad(x, ((0, 0), *pad, (0, 0))), (3, 0, 1, 2))
  g = dy.reshape(-1, cout)
  return jnp.stack([lax.dot_general(xt[:, :, i:i + ho, j:j + wo].reshape(cin, -1), g, (((1,), (0,)), ((), ())))
                    for i in range(3) for j in range(3)]).reshape(3, 3, cin, cout)


def dy_transposed(x, dy, pad):
  cin, cout = x.shape[-1], dy.shape[-1]
  gt = dy.reshape(-1, cout).T
  out = [lax.dot_general(gt, w.reshape(-1, cin), (((1,), (0,)), ((), ())))
         for w in conv._windows(x, (3, 3), (1, 1), pad, dy.shape[1:3])]
  return jnp.stack(out).transpose(0, 2, 1).reshape(3, 3, cin, cout)


def xla(x, dy, pad):
  w = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
  _, vjp = jax.vjp(lambda w_: lax.conv_general_dilated(x, w_, (1, 1), pad, dimension_numbers=conv._NHWC), w)
  return vjp(dy)[0]


def forward_lax(x, w, pad):
  return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=conv._NHWC)


def forward_im2col(x, w, pad):
  taps = jnp.concatenate(conv._windows(x, (3, 3), (1, 1), pad, x.shape[1:3]), axis=-1)
  return lax.dot_general(taps, w.reshape(-1, w.shape[-1]), (((3,), (0,)), ((), ())))


def forward_taps(x, w, pad):
  per_tap = w.reshape(9, *w.shape[2:])
  return sum(lax.dot_general(win, per_tap[t], (((3,), (0,)), ((), ())))
             for t, win in enumerate(conv._windows(x, (3, 3), (1, 1), pad, x.shape[1:3])))


FORWARD = {"lax": forward_lax, "im2col": forward_im2col, "taps": forward_taps}
KERNEL_GRADIENT = {"windows": windows, "im2col": im2col, "flat_offset": flat_offset,
                "channels_first": channels_first, "dy_transposed": dy_transposed, "lax": xla}


def seconds(fn, x, dy, reps: int) -> tuple[float, jax.Array]:
  fn = jax.jit(fn)
  out = fn(x, dy).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn(x, dy).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def run(layers=LAYERS, reps: int = 15, formulations=None) -> list[dict]:
  """Per layer, each formulation's median ms; `formulations` is KERNEL_GRADIENT (default) or FORWARD
  (whose second operand is the kernel, not dy)."""
  formulations = formulations or KERNEL_GRADIENT
  forward = formulations is FORWARD
  rng = np.random.default_rng(0)
  pad = ((1, 1), (1, 1))
  rows = []
  for batch, px, channels in layers:
    x = jnp.asarray(rng.standard_normal((batch, px, px, channels)), jnp.float32)
    shape = (3, 3, channels, channels) if forward else (batch, px, px, channels)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    row = {"batch": batch, "px": px, "channels": channels,
           "gflop": round(2 * 9 * batch * px * px * channels * channels / 1e9, 3)}
    reference = None
    for name, fn in formulations.items():
      sec, out = seconds(lambda x_, dy_, f=fn: f(x_, dy_, pad), x, dy, reps)
      reference = out if reference is None else reference
      row[name] = {"ms": round(sec * 1e3, 2), "gflop_per_s": round(row["gflop"] / sec, 1),
                   "max_rel_diff": float(jnp.abs(out - reference).max() / jnp.abs(reference).max())}
    rows.append(row)
  return rows


def main(argv):
  del argv
  result = {"reps": flags.FLAGS.reps}
  for title, formulations in (("kernel_gradient", KERNEL_GRADIENT), ("forward", FORWARD)):
    result[title] = run(reps=flags.FLAGS.reps, formulations=formulations)
    first = next(iter(formulations))
    print(title)
    for row in result[title]:
      print(f"  {row['batch']}x{row['px']}x{row['px']}x{row['channels']}:",
            "  ".join(f"{n} {row[n]['ms']:.1f} ms (x{row[first]['ms'] / row[n]['ms']:.2f})" for n in formulations))
  common.write("conv_formulations", result, flags.FLAGS.out, quiet=True)


if __name__ == "__main__":
  flags.DEFINE_integer("reps", 15, "Timed calls per formulation and layer (median reported).")
  flags.DEFINE_string("out", None, "JSON path; default bench/results/conv_formulations.json.")
  app.run(main)
