"""ABE-M (Kim et al., ECCV 2018): an attention-based ensemble on one ResNet.

M learners share the trunk S (stem to stage 3), the body of the attention
module and the global feature extractor G (stage 4); each learner m owns the
last 1x1 conv of its attention module A_m and its embedding E_m (the head,
`heads.EnsembleHead`):

    f_m(x) = E_m(G(S(x) * A_m(S(x))))

As in the metric-learning reference (there on GoogLeNet), the attention body
is a second copy of the next stage's layers, here stage 4 at stride 1 so the
masks keep stage 3's resolution, and each mask is 1x1 conv -> batch norm ->
ReLU. The reference re-runs the shared body once per learner; it is computed
once here (same result, 1/M of the cost). G runs on all M masked maps as one
batch of M*N, so its batch statistics pool the learners.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from histojax.models.resnet import STAGES, ResNet, batch_norm, block_class, conv, make_stage, run_stage, scaled_widths


class ABEResNet(ResNet):
  """Backbone: NHWC image -> per-learner pooled features [N, M, num_features]."""

  def __init__(self, depth: int = 50, width: float = 1.0, *, num_learners: int = 4,
               se_reduction: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
    if num_learners < 1:
      raise ValueError(f"model.num_learners must be at least 1, got {num_learners}")
    super().__init__(depth, width, se_reduction=se_reduction, dtype=dtype, rngs=rngs)
    block_cls = block_class(depth)
    c3 = self.stage_channels[2]
    w4 = scaled_widths(width)[3]
    self.num_learners = num_learners
    self.attention = make_stage(block_cls, c3, w4, STAGES[depth][1][3], 1,
                                se_reduction=se_reduction, dtype=dtype, rngs=rngs)
    # The M learners' own 1x1 convs, stacked along output channels: one conv
    # to M*c3 channels is exactly M independent convs (and BN is per channel).
    self.learner_masks = conv(w4 * block_cls.expansion, num_learners * c3, 1, dtype=dtype, rngs=rngs)
    self.learner_bn = batch_norm(num_learners * c3, dtype=dtype, rngs=rngs)

  def attention_masks(self, shared):
    """[N, h, w, c3] trunk features -> [N, M, h, w, c3] non-negative masks."""
    n, h, w, c = shared.shape
    masks = nnx.relu(self.learner_bn(self.learner_masks(run_stage(self.attention, shared))))
    return jnp.moveaxis(masks.reshape(n, h, w, self.num_learners, c), 3, 1)

  def __call__(self, x):
    shared = self.through_stage3(x)
    masked = shared[:, None] * self.attention_masks(shared)
    n, m = masked.shape[:2]
    # Learners ride along the batch axis through G; batch-major order keeps the
    # data-parallel sharding of the leading axis.
    g = run_stage(self.layer4, masked.reshape(n * m, *masked.shape[2:]))
    return jnp.mean(g, axis=(1, 2)).reshape(n, m, -1)
