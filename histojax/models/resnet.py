"""ResNet-18/34/50/101 in Flax NNX, torchvision layout (stride on the 3x3 conv).

`width` scales every channel count (1.0 is the published model); small widths
make fast test and CPU models with the same structure.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}

# He init on fan-out, as torchvision does for convolutions.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(cin, cout, k, stride=1, *, dtype, rngs):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=k // 2, use_bias=False,
                  kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def batch_norm(c, *, dtype, rngs, zero_init=False):
  # torchvision's momentum 0.1 is Flax's 0.9. Under jit on a data-sharded mesh
  # the batch mean is a mean over the *global* batch: XLA adds the all-reduce.
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                       rngs=rngs)


class Downsample(nnx.Module):
  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(cout, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin, width, stride, *, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = conv(cin, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, cout, 3, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(cout, dtype=dtype, rngs=rngs)
    self.downsample = Downsample(cin, cout, stride, dtype=dtype, rngs=rngs) if stride != 1 or cin != cout else None

  def residual(self, x):
    return self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))

  def __call__(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    return nnx.relu(self.residual(x) + shortcut)


class Bottleneck(BasicBlock):
  expansion = 4

  def __init__(self, cin, width, stride, *, dtype, rngs):
    cout = width * self.expansion
    self.conv1 = conv(cin, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv3 = conv(width, cout, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(cout, dtype=dtype, rngs=rngs)
    self.downsample = Downsample(cin, cout, stride, dtype=dtype, rngs=rngs) if stride != 1 or cin != cout else None

  def residual(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.bn3(self.conv3(x))


class ResNet(nnx.Module):
  """Backbone: NHWC image -> pooled features [N, num_features]."""

  def __init__(self, depth: int = 50, width: float = 1.0, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if depth not in STAGES:
      raise ValueError(f"model.depth must be one of {sorted(STAGES)}, got {depth}")
    kind, blocks = STAGES[depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    self.conv1 = conv(3, widths[0], 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(widths[0], dtype=dtype, rngs=rngs)
    cin = widths[0]
    # Stages keep torchvision's names (layer1..layer4) so published weights map
    # one to one and stage outputs stay addressable.
    for stage, (w, n) in enumerate(zip(widths, blocks)):
      layer = []
      for i in range(n):
        layer.append(block_cls(cin, w, 2 if stage > 0 and i == 0 else 1, dtype=dtype, rngs=rngs))
        cin = w * block_cls.expansion
      setattr(self, f"layer{stage + 1}", nnx.List(layer))
    self.num_features = cin

  def stem(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  def feature_map(self, x):
    x = self.stem(x)
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
    return x

  def __call__(self, x):
    return jnp.mean(self.feature_map(x), axis=(1, 2))
