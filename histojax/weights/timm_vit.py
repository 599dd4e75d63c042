"""timm VisionTransformer state dicts (ImageNet ViTs, UNI-style pathology ViTs).

Names match histojax's ViT module by module (`blocks.N.attn.qkv`, `ls1.gamma`,
...); the patch embedding conv sits one level deeper (`patch_embed.proj`),
average-pooling models name their final norm `fc_norm`, and the classifier
`head` is not part of the backbone. Register tokens and SwiGLU MLPs are not
implemented: such checkpoints fail with their keys listed.
"""

from __future__ import annotations

import math
import re

from histojax.weights.transfer import Format, same


def infer(tensors: dict) -> dict:
  if "patch_embed.proj.weight" not in tensors or "pos_embed" not in tensors:
    raise ValueError("not a timm ViT: no patch_embed.proj.weight / pos_embed")
  width, _, patch, _ = tensors["patch_embed.proj.weight"].shape
  layers = len({m.group(1) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))})
  grid = math.isqrt(tensors["pos_embed"].shape[1] - 1)
  preset = {(768, 16): "vit_b16", (1024, 16): "vit_l16"}
  return {"name": preset.get((width, patch), "vit_b16"), "width": int(width), "layers": layers,
          "heads": max(1, int(width) // 64),  # timm's ViT-S/B/L/g all use 64-d heads; ViT-H/14 uses 80: set model.heads
          "patch": int(patch), "image_size": grid * int(patch),
          "mlp_dim": int(tensors["blocks.0.mlp.fc1.weight"].shape[0]),
          # The init value does not matter once weights are loaded; its presence does.
          "layer_scale": 1e-5 if "blocks.0.ls1.gamma" in tensors else 0.0,
          "pool": "avg" if "fc_norm.weight" in tensors else "token"}


FORMAT = Format(
    name="timm_vit",
    description="timm VisionTransformer (`vit_base_patch16_224`, `vit_large_patch16_224`, UNI)",
    renames=((r"^patch_embed\.proj\.", "backbone.patch_embed."), (r"^cls_token$", "backbone.cls_token"),
             (r"^pos_embed$", "backbone.pos_embed"), (r"^blocks\.", "backbone.blocks."),
             (r"^norm\.", "backbone.norm."), (r"^fc_norm\.", "backbone.norm.")),
    ignore=((r"^head\.", "classifier (heads are trained, not imported)"),),
    special=((r"backbone\.cls_token", lambda v, shape: same(v)), (r"backbone\.pos_embed", lambda v, shape: same(v))),
    infer=infer,
)
