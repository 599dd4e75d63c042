"""ResNet-18/34/50/101 and SE-ResNet in Flax NNX, torchvision layout.

Stride sits on the 3x3 conv (torchvision's "ResNet v1.5"); module names follow
torchvision (`conv1`, `bn1`, `layer1..layer4`, `downsample`) and timm's SE
blocks (`se.fc1`, `se.fc2`), so published weights map one to one.

`width` scales every channel count (1.0 is the published model); small widths
make fast test and CPU models with the same structure. The backbone returns
the last feature map [N, H, W, C]: pooling belongs to the head, because
global descriptors (CGD) pool in several ways.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from histojax.models.conv import conv_general_dilated, max_pool

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}

# He init on fan-out, as torchvision does for convolutions.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(cin, cout, k, stride=1, *, dtype, rngs, bias=False):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=k // 2, use_bias=bias,
                  kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                  conv_general_dilated=conv_general_dilated)  # matrix-product gradients on CPU


def batch_norm(c, *, dtype, rngs, zero_init=False):
  # torchvision's momentum 0.1 is Flax's 0.9. Under jit on a data-sharded mesh
  # the batch mean is a mean over the *global* batch: XLA adds the all-reduce.
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                       rngs=rngs)


def scaled_widths(width: float) -> list[int]:
  return [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]


class SqueezeExcite(nnx.Module):
  """Channel attention (Hu et al. 2018): x * sigmoid(fc2(relu(fc1(mean_hw(x)))))."""

  def __init__(self, c, reduction, *, dtype, rngs):
    hidden = max(1, c // reduction)
    self.fc1 = conv(c, hidden, 1, dtype=dtype, rngs=rngs, bias=True)
    self.fc2 = conv(hidden, c, 1, dtype=dtype, rngs=rngs, bias=True)

  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    return x * nnx.sigmoid(self.fc2(nnx.relu(self.fc1(s))))


class Downsample(nnx.Module):
  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, *, se_reduction=0, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = conv(cin, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, cout, 3, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(cout, dtype=dtype, rngs=rngs)
    self._finish(cin, cout, stride, se_reduction, dtype, rngs)

  def _finish(self, cin, cout, stride, se_reduction, dtype, rngs):
    self.se = SqueezeExcite(cout, se_reduction, dtype=dtype, rngs=rngs) if se_reduction else None
    self.downsample = (Downsample(cin, cout, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or cin != cout else None)

  def residual(self, x):
    return self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))

  def __call__(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.residual(x)
    if self.se is not None:  # SE rescales the residual branch before the sum
      out = self.se(out)
    return nnx.relu(out + shortcut)


class Bottleneck(BasicBlock):
  expansion = 4

  def __init__(self, cin, width, stride, *, se_reduction=0, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = conv(cin, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv3 = conv(width, cout, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(cout, dtype=dtype, rngs=rngs)
    self._finish(cin, cout, stride, se_reduction, dtype, rngs)

  def residual(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.bn3(self.conv3(x))


def block_class(depth: int):
  if depth not in STAGES:
    raise ValueError(f"model.depth must be one of {sorted(STAGES)}, got {depth}")
  return BasicBlock if STAGES[depth][0] == "basic" else Bottleneck


def make_stage(block_cls, cin, width, blocks, stride, *, se_reduction, dtype, rngs) -> nnx.List:
  """`blocks` residual blocks; the first one carries the stride (and the projection)."""
  layer = []
  for i in range(blocks):
    layer.append(block_cls(cin, width, stride if i == 0 else 1, se_reduction=se_reduction,
                           dtype=dtype, rngs=rngs))
    cin = width * block_cls.expansion
  return nnx.List(layer)


def run_stage(layer, x):
  for block in layer:
    x = block(x)
  return x


class ResNet(nnx.Module):
  """Backbone: NHWC image -> last feature map [N, H/32, W/32, num_features].

  `se_reduction` > 0 adds squeeze-excitation to every block (SE-ResNet);
  `last_stride` 1 keeps stage 4 at stage 3's resolution (as CGD does).
  """

  def __init__(self, depth: int = 50, width: float = 1.0, *, se_reduction: int = 0,
               last_stride: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
    block_cls = block_class(depth)
    if last_stride not in (1, 2):
      raise ValueError(f"model.last_stride must be 1 or 2, got {last_stride}")
    widths = scaled_widths(width)
    self.conv1 = conv(3, widths[0], 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(widths[0], dtype=dtype, rngs=rngs)
    cin = widths[0]
    strides = (1, 2, 2, last_stride)
    # Stages keep torchvision's names (layer1..layer4) so published weights map
    # one to one and stage outputs stay addressable.
    channels = []
    for stage, (w, n, s) in enumerate(zip(widths, STAGES[depth][1], strides)):
      setattr(self, f"layer{stage + 1}", make_stage(block_cls, cin, w, n, s, se_reduction=se_reduction,
                                                    dtype=dtype, rngs=rngs))
      cin = w * block_cls.expansion
      channels.append(cin)
    self.stage_channels = tuple(channels)  # output channels of layer1..layer4
    self.num_features = cin

  def stem(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # nnx.max_pool's, faster gradient on CPU

  def through_stage3(self, x):
    """Stem and stages 1-3: the shared trunk of attention models."""
    x = self.stem(x)
    for layer in (self.layer1, self.layer2, self.layer3):
      x = run_stage(layer, x)
    return x

  def feature_map(self, x):
    return run_stage(self.layer4, self.through_stage3(x))

  def __call__(self, x):
    return self.feature_map(x)
