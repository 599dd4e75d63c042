"""The metric-learning reference's mixed-attention SE-ResNet (Yang et al., BIBM 2019).

Channel attention: squeeze-excitation in every residual block. Spatial-channel
attention: a mask branch reads stage 3's features through SE bottlenecks at
stride 1 (as many as stage 4 has, so the mask keeps stage 3's resolution), a
1x1 conv back to stage 3's width, batch norm and a sigmoid; the mask multiplies
stage 3's features elementwise before stage 4. With the reference's linear-512
head this is 45.7M parameters at depth 50.

The reference's stem max-pools with `ceil_mode=True` and no padding; this one
keeps torchvision's padded pool (same output size at 224 px) so that ImageNet
SE-ResNet-50 weights (timm `seresnet50`) load into the trunk unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from histojax.models.resnet import STAGES, ResNet, batch_norm, block_class, conv, make_stage, run_stage, scaled_widths


class MixedAttentionResNet(ResNet):
  """SE-ResNet whose stage-3 output is gated by a learned mask before stage 4."""

  def __init__(self, depth: int = 50, width: float = 1.0, *, se_reduction: int = 16,
               dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(depth, width, se_reduction=se_reduction, dtype=dtype, rngs=rngs)
    block_cls = block_class(depth)
    c3 = self.stage_channels[2]
    w4 = scaled_widths(width)[3]
    self.mask_branch = make_stage(block_cls, c3, w4, STAGES[depth][1][3], 1,
                                  se_reduction=se_reduction, dtype=dtype, rngs=rngs)
    self.mask_conv = conv(w4 * block_cls.expansion, c3, 1, dtype=dtype, rngs=rngs)
    self.mask_bn = batch_norm(c3, dtype=dtype, rngs=rngs)

  def attention_mask(self, stage3):
    """Per-position, per-channel weights in (0, 1), shaped like stage 3's output."""
    return nnx.sigmoid(self.mask_bn(self.mask_conv(run_stage(self.mask_branch, stage3))))

  def feature_map(self, x):
    x = self.through_stage3(x)
    return run_stage(self.layer4, x * self.attention_mask(x))
