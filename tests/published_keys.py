"""Key names and shapes of published state dicts, written out from the libraries' layouts.

Independent of histojax's mappings (nothing here imports them); checked once
against torchvision 0.29, timm 1.0.29 and open_clip 3.3 state dicts, key for
key and shape for shape.
"""

from __future__ import annotations

RESNET_STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def _bn(prefix, c, counter=True):
  keys = {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
          f"{prefix}.running_var": (c,)}
  if counter:
    keys[f"{prefix}.num_batches_tracked"] = ()
  return keys


def torchvision_resnet(depth=50, base=64, se=False, classes=1000):
  """torchvision `resnet{depth}`; with `se`, timm's `seresnet{depth}` (same names + se.fc1/fc2)."""
  kind, blocks = RESNET_STAGES[depth]
  expansion = 4 if kind == "bottleneck" else 1
  keys = {"conv1.weight": (base, 3, 7, 7), **_bn("bn1", base)}
  cin = base
  for stage, n in enumerate(blocks):
    width = base * 2 ** stage
    cout = width * expansion
    for j in range(n):
      p = f"layer{stage + 1}.{j}"
      if kind == "bottleneck":
        keys.update({f"{p}.conv1.weight": (width, cin, 1, 1), **_bn(f"{p}.bn1", width),
                     f"{p}.conv2.weight": (width, width, 3, 3), **_bn(f"{p}.bn2", width),
                     f"{p}.conv3.weight": (cout, width, 1, 1), **_bn(f"{p}.bn3", cout)})
      else:
        keys.update({f"{p}.conv1.weight": (width, cin, 3, 3), **_bn(f"{p}.bn1", width),
                     f"{p}.conv2.weight": (width, width, 3, 3), **_bn(f"{p}.bn2", width)})
      if se:
        keys.update({f"{p}.se.fc1.weight": (cout // 16, cout, 1, 1), f"{p}.se.fc1.bias": (cout // 16,),
                     f"{p}.se.fc2.weight": (cout, cout // 16, 1, 1), f"{p}.se.fc2.bias": (cout,)})
      if j == 0 and (stage > 0 or cin != cout):
        keys.update({f"{p}.downsample.0.weight": (cout, cin, 1, 1), **_bn(f"{p}.downsample.1", cout)})
      cin = cout
  keys.update({"fc.weight": (classes, cin), "fc.bias": (classes,)})
  return keys


def _clip_block(p, d, mlp):
  return {f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,), f"{p}.attn.in_proj_weight": (3 * d, d),
          f"{p}.attn.in_proj_bias": (3 * d,), f"{p}.attn.out_proj.weight": (d, d), f"{p}.attn.out_proj.bias": (d,),
          f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,), f"{p}.mlp.c_fc.weight": (mlp, d),
          f"{p}.mlp.c_fc.bias": (mlp,), f"{p}.mlp.c_proj.weight": (d, mlp), f"{p}.mlp.c_proj.bias": (d,)}


def clip_model(width=768, layers=12, patch=16, image=224, embed=512, text_width=512, text_layers=12,
               context=77, vocab=49408):
  """A full CLIP state dict (open_clip / OpenAI names): `visual.*` plus the text tower."""
  grid = image // patch
  keys = {"positional_embedding": (context, text_width), "text_projection": (text_width, embed),
          "logit_scale": (), "token_embedding.weight": (vocab, text_width),
          "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
          "visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
          "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
          "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
          "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)}
  for i in range(layers):
    keys.update(_clip_block(f"visual.transformer.resblocks.{i}", width, 4 * width))
  for i in range(text_layers):
    keys.update(_clip_block(f"transformer.resblocks.{i}", text_width, 4 * text_width))
  return keys


def timm_vit(width=768, layers=12, patch=16, image=224, mlp_ratio=4, layer_scale=False, classes=1000):
  """timm `vit_*_patch16_224`; `layer_scale` as UNI's `init_values`, classes=0 drops `head`."""
  grid, mlp = image // patch, int(mlp_ratio * width)
  keys = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
          "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}
  for i in range(layers):
    p = f"blocks.{i}"
    keys.update({f"{p}.norm1.weight": (width,), f"{p}.norm1.bias": (width,),
                 f"{p}.attn.qkv.weight": (3 * width, width), f"{p}.attn.qkv.bias": (3 * width,),
                 f"{p}.attn.proj.weight": (width, width), f"{p}.attn.proj.bias": (width,),
                 f"{p}.norm2.weight": (width,), f"{p}.norm2.bias": (width,),
                 f"{p}.mlp.fc1.weight": (mlp, width), f"{p}.mlp.fc1.bias": (mlp,),
                 f"{p}.mlp.fc2.weight": (width, mlp), f"{p}.mlp.fc2.bias": (width,)})
    if layer_scale:
      keys.update({f"{p}.ls1.gamma": (width,), f"{p}.ls2.gamma": (width,)})
  keys.update({"norm.weight": (width,), "norm.bias": (width,)})
  if classes:
    keys.update({"head.weight": (classes, width), "head.bias": (classes,)})
  return keys
