"""Key names and shapes of published state dicts, written out from the libraries' layouts.

Independent of histojax's mappings (nothing here imports them); checked once
against torchvision 0.29, timm 1.0.29 and open_clip 3.3 state dicts, key for
key and shape for shape. The foundation-model layouts (timm with registers and
SwiGLU, transformers ViT / DINOv2 / DINOv2 with registers) are loaded strictly
into timm 1.0.31 and transformers 5.25 models by tests/fixtures/make_encoder_parity.py.
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


def timm_vit(width=768, layers=12, patch=16, image=224, mlp_ratio=4, layer_scale=False, classes=1000,
             reg_tokens=0, no_embed_class=False, glu=False, mlp_hidden=None):
  """timm `vit_*_patch16_224`; `layer_scale` as UNI's `init_values`, classes=0 drops `head`;
  `reg_tokens`, `no_embed_class` as timm's; `glu`: SwiGLUPacked (fc2 reads half of fc1); `mlp_hidden`
  (fc1's width) instead of int(mlp_ratio * width)."""
  grid, mlp = image // patch, mlp_hidden or int(mlp_ratio * width)
  prefix = 0 if no_embed_class else 1 + reg_tokens
  keys = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + prefix, width),
          "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}
  if reg_tokens:
    keys["reg_token"] = (1, reg_tokens, width)
  for i in range(layers):
    p = f"blocks.{i}"
    keys.update({f"{p}.norm1.weight": (width,), f"{p}.norm1.bias": (width,),
                 f"{p}.attn.qkv.weight": (3 * width, width), f"{p}.attn.qkv.bias": (3 * width,),
                 f"{p}.attn.proj.weight": (width, width), f"{p}.attn.proj.bias": (width,),
                 f"{p}.norm2.weight": (width,), f"{p}.norm2.bias": (width,),
                 f"{p}.mlp.fc1.weight": (mlp, width), f"{p}.mlp.fc1.bias": (mlp,),
                 f"{p}.mlp.fc2.weight": (width, mlp // 2 if glu else mlp), f"{p}.mlp.fc2.bias": (width,)})
    if layer_scale:
      keys.update({f"{p}.ls1.gamma": (width,), f"{p}.ls2.gamma": (width,)})
  keys.update({"norm.weight": (width,), "norm.bias": (width,)})
  if classes:
    keys.update({"head.weight": (classes, width), "head.bias": (classes,)})
  return keys


def transformers_vit(model_type="dinov2", width=768, layers=12, patch=14, image=224, mlp_hidden=3072,
                     swiglu=False, reg_tokens=0, pooler=False):
  """transformers' published (hub) names: ViTModel (`model_type="vit"`, LayerNorms `layernorm_before/after`,
  `intermediate`/`output`, optional `pooler`) or Dinov2Model / Dinov2WithRegistersModel (`norm1/2`,
  `layer_scale1/2.lambda1`, `mlp.fc1/fc2` or the SwiGLU's packed `mlp.weights_in/weights_out`).
  `mlp_hidden` is the MLP's inner width (for SwiGLU, each half of weights_in)."""
  grid = image // patch
  keys = {"embeddings.cls_token": (1, 1, width), "embeddings.position_embeddings": (1, grid * grid + 1, width),
          "embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
          "embeddings.patch_embeddings.projection.bias": (width,),
          "layernorm.weight": (width,), "layernorm.bias": (width,)}
  if model_type != "vit":
    keys["embeddings.mask_token"] = (1, width)
  if reg_tokens:
    keys["embeddings.register_tokens"] = (1, reg_tokens, width)
  if pooler:
    keys.update({"pooler.dense.weight": (width, width), "pooler.dense.bias": (width,)})
  for i in range(layers):
    p = f"encoder.layer.{i}"
    for part in ("query", "key", "value"):
      keys.update({f"{p}.attention.attention.{part}.weight": (width, width),
                   f"{p}.attention.attention.{part}.bias": (width,)})
    keys.update({f"{p}.attention.output.dense.weight": (width, width), f"{p}.attention.output.dense.bias": (width,)})
    if model_type == "vit":
      norms, mlp = ("layernorm_before", "layernorm_after"), {
          "intermediate.dense.weight": (mlp_hidden, width), "intermediate.dense.bias": (mlp_hidden,),
          "output.dense.weight": (width, mlp_hidden), "output.dense.bias": (width,)}
    else:
      norms = ("norm1", "norm2")
      fc1, fc2 = ("mlp.weights_in", "mlp.weights_out") if swiglu else ("mlp.fc1", "mlp.fc2")
      packed = 2 * mlp_hidden if swiglu else mlp_hidden
      mlp = {f"{fc1}.weight": (packed, width), f"{fc1}.bias": (packed,), f"{fc2}.weight": (width, mlp_hidden),
             f"{fc2}.bias": (width,), "layer_scale1.lambda1": (width,), "layer_scale2.lambda1": (width,)}
    for norm in norms:
      keys.update({f"{p}.{norm}.weight": (width,), f"{p}.{norm}.bias": (width,)})
    keys.update({f"{p}.{k}": v for k, v in mlp.items()})
  return keys
