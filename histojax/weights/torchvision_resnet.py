"""torchvision ResNet (and timm ResNet / SE-ResNet) state dicts.

torchvision names the shortcut projection `downsample.0` (conv) and
`downsample.1` (batch norm); timm's SE-ResNets add `se.fc1` / `se.fc2`, named
the same here. The ImageNet classifier `fc` is not part of the backbone.
"""

from __future__ import annotations

import re

from histojax.models.resnet import STAGES
from histojax.weights.transfer import Format


def infer(tensors: dict) -> dict:
  """depth, width and SE reduction from the stage lengths and channel counts."""
  if "conv1.weight" not in tensors:
    raise ValueError("not a torchvision ResNet state dict: no conv1.weight")
  blocks = tuple(len({m.group(1) for k in tensors if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                 for i in range(1, 5))
  kind = "bottleneck" if "layer1.0.conv3.weight" in tensors else "basic"
  depth = next((d for d, spec in STAGES.items() if spec == (kind, blocks)), None)
  if depth is None:
    raise ValueError(f"ResNet with {kind} blocks {blocks} per stage is not one of depths {sorted(STAGES)}")
  fields = {"name": "resnet", "depth": depth, "width": tensors["conv1.weight"].shape[0] / 64}
  se = tensors.get("layer1.0.se.fc1.weight")
  if se is not None:
    fields.update(name="se_resnet", se_reduction=int(se.shape[1] // se.shape[0]))
  return fields


FORMAT = Format(
    name="torchvision_resnet",
    description="torchvision / timm ResNet-18/34/50/101 and SE-ResNet (`resnet50-*.pth`, timm `seresnet50`)",
    renames=((r"^", "backbone."), (r"\.downsample\.0\.", ".downsample.conv."),
             (r"\.downsample\.1\.", ".downsample.bn.")),
    ignore=((r"^fc\.", "ImageNet classifier (heads are trained, not imported)"),
            (r"num_batches_tracked$", "batch-norm step counter (unused)")),
    infer=infer,
)
