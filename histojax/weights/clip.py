"""OpenAI CLIP and open_clip image towers.

Both name the image tower `visual.*` inside a full CLIP state dict (the text
tower is ignored) and use torch.nn.MultiheadAttention, whose fused
`in_proj_weight` is [3D, D] in q|k|v order. `proj` is stored [D, out] and used
as `x @ proj`, already the JAX layout. The class token and position embedding
lack timm's leading batch axes. OpenAI's own `.pt` files are TorchScript
archives, read the same way.
"""

from __future__ import annotations

import math
import re

from histojax.weights.transfer import Format, leading_ones, same

_TOWER = "visual."


def scope(tensors: dict) -> tuple[dict, dict]:
  """The image tower's tensors (names kept); a bare tower (no `visual.` names) is taken whole."""
  if not any(k.startswith(_TOWER) for k in tensors):
    return dict(tensors), {}
  tower = {k: v for k, v in tensors.items() if k.startswith(_TOWER)}
  return tower, {k: "text tower / logit scale (not the image tower)" for k in tensors if not k.startswith(_TOWER)}


def infer(tensors: dict) -> dict:
  tensors = {k.removeprefix(_TOWER): v for k, v in scope(tensors)[0].items()}
  if "conv1.weight" not in tensors or "positional_embedding" not in tensors:
    raise ValueError("not a CLIP image tower: no conv1.weight / positional_embedding")
  width, _, patch, _ = tensors["conv1.weight"].shape
  layers = len({m.group(1) for k in tensors if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
  grid = math.isqrt(tensors["positional_embedding"].shape[0] - 1)
  proj = tensors.get("proj")
  preset = {(768, 32): "clip_vit_b32", (768, 16): "clip_vit_b16", (1024, 14): "clip_vit_l14"}
  return {"name": preset.get((width, patch), "clip_vit_b16"), "width": int(width), "layers": layers,
          "heads": max(1, int(width) // 64),  # every CLIP ViT uses 64-d heads except ViT-H/g: set model.heads there
          "patch": int(patch), "image_size": grid * int(patch),
          "mlp_dim": int(tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
          "proj_dim": 0 if proj is None else int(proj.shape[1])}


FORMAT = Format(
    name="clip",
    description="OpenAI CLIP (`ViT-B-16.pt`, TorchScript) and open_clip image towers (`visual.*`)",
    scope=scope,
    renames=((r"^visual\.", ""), (r"^conv1\.", "backbone.patch_embed."), (r"^class_embedding$", "backbone.cls_token"),
             (r"^positional_embedding$", "backbone.pos_embed"), (r"^ln_pre\.", "backbone.norm_pre."),
             (r"^ln_post\.", "backbone.norm."), (r"^proj$", "backbone.proj.kernel"),
             (r"^transformer\.resblocks\.(\d+)\.", r"backbone.blocks.\1."), (r"\.ln_1\.", ".norm1."),
             (r"\.ln_2\.", ".norm2."), (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.c_fc\.", ".mlp.fc1."),
             (r"\.mlp\.c_proj\.", ".mlp.fc2."), (r"\.ls_1\.", ".ls1."), (r"\.ls_2\.", ".ls2.")),
    special=((r"backbone\.cls_token", leading_ones), (r"backbone\.pos_embed", leading_ones),
             (r"backbone\.proj\.kernel", lambda v, shape: same(v))),
    infer=infer,
)
