"""Vision Transformers: the CLIP image tower, timm's ViT and transformers' ViT/DINOv2, one implementation.

All are pre-norm transformers over square patches with a class token and
learned position embeddings; attention is one fused q|k|v projection here
(transformers' separate query/key/value are fused when imported). They differ
in switches, set per family by the model zoo and per published model by
`models.presets`:

  CLIP (OpenAI, open_clip)  patch conv without bias, a LayerNorm before the
                            blocks (`ln_pre`), QuickGELU or GELU, eps 1e-5,
                            final projection `proj`.
  timm                      patch conv with bias, GELU, eps 1e-6, optional
                            LayerScale (`init_values`), register tokens
                            (`reg_tokens`), position embeddings over the class
                            and register tokens too, or over the patches only
                            (`no_embed_class`), SwiGLUPacked MLPs + SiLU.
  transformers              ViT (eps 1e-12) and DINOv2 (LayerScale, SwiGLU,
                            registers inserted after the position embedding).

Module names follow timm (`blocks.N.attn.qkv`, `mlp.fc1`, `reg_token`, ...).
Token order is always [class, registers..., patches]. Inputs of other sizes
than `image_size` work: the position grid is resampled (`models.resample`) by
the rule the family's reference uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from histojax.models import resample as resample_lib

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's activation
    "silu": jax.nn.silu,  # SwiGLU's gate (timm SwiGLUPacked, DINOv2)
}
# token: the class token; avg: mean of the patch tokens, normed after pooling (timm's fc_norm);
# token_patch_mean: [class token, mean of the patch tokens], both normed, registers left out
# (Virchow, Virchow2, Midnight's recommended feature).
POOLS = ("token", "avg", "token_patch_mean")
# mlp: fc1 -> act -> fc2. glu: fc1 packs [gate | value] (mlp_dim wide), act(gate) * value -> fc2
# (timm's SwiGLUPacked = GluMlp(gate_last=False) and DINOv2's SwiGLU gate the first half).
MLPS = ("mlp", "glu")
# Which tokens the learned position embeddings cover: prefix = class + registers + patches (timm's
# default); patches = patches only (timm no_embed_class); class = class + patches, registers added
# after (DINOv2 with registers, transformers).
POS_EMBEDS = ("prefix", "patches", "class")

_dense_init = nnx.initializers.truncated_normal(0.02)


def dense(din, dout, *, bias=True, dtype, rngs):
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=_dense_init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def layer_norm(d, eps, *, dtype, rngs):
  return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused q|k|v projection (q, k, v blocks, heads inside)."""

  def __init__(self, dim, heads, *, dtype, rngs):
    if heads < 1 or dim % heads:
      raise ValueError(f"model.width ({dim}) must be divisible by model.heads ({heads})")
    self.heads = heads
    self.qkv = dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.heads
    # Heads-major [3, b, heads, n, hd] once, as timm does: both attention products are then plain
    # batched matmuls. Leaving heads inside the token axis made XLA's CPU backend copy and transpose
    # around each einsum: a ViT-B/16 layer's attention took 81 instead of 48 ms for 8 images on 2 cores
    # (bench/results/attention_layout.json; 1.07x at 785 tokens, where the softmax dominates).
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
    # Logits and softmax in fp32 even when the trunk runs in bf16.
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class MLP(nnx.Module):
  def __init__(self, dim, hidden, act, *, dtype, rngs):
    self.act = act
    self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class GluMLP(nnx.Module):
  """Gated MLP with one packed input projection: fc2(act(first half) * second half)."""

  def __init__(self, dim, hidden, act, *, dtype, rngs):
    if hidden % 2:
      raise ValueError(f"model.mlp_dim ({hidden}) must be even with model.mlp='glu' (fc1 packs gate and value)")
    self.act = act
    self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden // 2, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    gate, value = jnp.split(self.fc1(x), 2, axis=-1)
    return self.fc2(ACTIVATIONS[self.act](gate) * value)


class LayerScale(nnx.Module):
  """Per-channel residual-branch scale (CaiT), used by UNI-style ViTs."""

  def __init__(self, dim, init_value):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, dim, heads, mlp_dim, act, *, eps, layer_scale, mlp="mlp", dtype, rngs):
    self.norm1 = layer_norm(dim, eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, layer_scale) if layer_scale else None
    self.norm2 = layer_norm(dim, eps, dtype=dtype, rngs=rngs)
    self.mlp = (GluMLP if mlp == "glu" else MLP)(dim, mlp_dim, act, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(dim, layer_scale) if layer_scale else None

  def __call__(self, x):
    y = self.attn(self.norm1(x))
    x = x + (y if self.ls1 is None else self.ls1(y))
    y = self.mlp(self.norm2(x))
    return x + (y if self.ls2 is None else self.ls2(y))


class VisionTransformer(nnx.Module):
  """Backbone: NHWC image -> pooled features [N, num_features]."""

  def __init__(self, *, width: int, layers: int, heads: int, patch: int, image_size: int, mlp_dim: int,
               act: str, ln_eps: float, patch_bias: bool, pre_norm: bool, proj_dim: int = 0,
               layer_scale: float = 0.0, pool: str = "token", mlp: str = "mlp", reg_tokens: int = 0,
               pos_embed: str = "prefix", resample: str = "bicubic_antialias", dtype=jnp.float32,
               rngs: nnx.Rngs):
    _check_choices(act=(act, ACTIVATIONS), pool=(pool, POOLS), mlp=(mlp, MLPS), pos_embed=(pos_embed, POS_EMBEDS),
                   resample=(resample, resample_lib.RULES))
    if image_size % patch:
      raise ValueError(f"model.image_size ({image_size}) must be a multiple of model.patch ({patch})")
    if reg_tokens < 0:
      raise ValueError(f"model.reg_tokens must be >= 0, got {reg_tokens}")
    self.patch, self.pool, self.dtype, self.resample = patch, pool, dtype, resample
    self.grid = image_size // patch
    self.num_prefix = 1 + reg_tokens  # class + register tokens, ahead of the patches
    self.pos_prefix = {"prefix": self.num_prefix, "patches": 0, "class": 1}[pos_embed]
    self.patch_embed = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID", use_bias=patch_bias,
                                kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width)))
    self.reg_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, reg_tokens, width))) if reg_tokens else None
    self.pos_embed = nnx.Param(_dense_init(rngs.params(), (1, self.pos_prefix + self.grid ** 2, width)))
    self.norm_pre = layer_norm(width, ln_eps, dtype=dtype, rngs=rngs) if pre_norm else None
    self.blocks = nnx.List([Block(width, heads, mlp_dim, act, eps=ln_eps, layer_scale=layer_scale, mlp=mlp,
                                  dtype=dtype, rngs=rngs) for _ in range(layers)])
    self.norm = layer_norm(width, ln_eps, dtype=dtype, rngs=rngs)
    self.proj = dense(width, proj_dim, bias=False, dtype=dtype, rngs=rngs) if proj_dim else None
    self.num_features = proj_dim or (2 * width if pool == "token_patch_mean" else width)

  def position_embedding(self, gh: int, gw: int):
    """[1, pos_prefix + gh*gw, D]; the patch part resampled when the grid is not the native one."""
    pos = self.pos_embed[...]
    if (gh, gw) == (self.grid, self.grid):
      return pos
    prefix, grid = pos[:, :self.pos_prefix], pos[:, self.pos_prefix:].reshape(1, self.grid, self.grid, -1)
    grid = resample_lib.resample_grid(grid, (gh, gw), self.resample)
    return jnp.concatenate([prefix, grid.reshape(1, gh * gw, -1).astype(pos.dtype)], axis=1)

  def tokens(self, x):
    """Final-layer tokens [N, prefix + patches, width]: class, registers, patches (before the final norm)."""
    n, h, w, _ = x.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"input images {h}x{w} px are not a multiple of model.patch ({self.patch})")
    x = self.patch_embed(x.astype(self.dtype))
    gh, gw, d = x.shape[1:]
    prefix = [self.cls_token[...]] + ([self.reg_token[...]] if self.reg_token is not None else [])
    prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1), (n, self.num_prefix, d))
    pos = self.position_embedding(gh, gw)
    # Prefix tokens the embeddings do not cover get nothing added (registers in DINOv2, all in no_embed_class).
    pos_prefix = jnp.pad(pos[:, :self.pos_prefix], ((0, 0), (0, self.num_prefix - self.pos_prefix), (0, 0)))
    x = jnp.concatenate([prefix + pos_prefix, x.reshape(n, gh * gw, d) + pos[:, self.pos_prefix:]], axis=1)
    x = x.astype(self.dtype)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    for block in self.blocks:
      x = block(x)
    return x

  def __call__(self, x):
    tokens = self.tokens(x)
    if self.pool == "token_patch_mean":
      tokens = self.norm(tokens)
      pooled = jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, self.num_prefix:], axis=1)], axis=-1)
    else:
      # LayerNorm is per token, so norm-then-pick equals pick-then-norm; avg norms the mean (timm's fc_norm).
      pooled = self.norm(tokens[:, 0] if self.pool == "token" else jnp.mean(tokens[:, self.num_prefix:], axis=1))
    return pooled if self.proj is None else self.proj(pooled)


def _check_choices(**fields) -> None:
  for name, (value, choices) in fields.items():
    if value not in choices:
      raise ValueError(f"model.{name} must be one of {sorted(choices)}, got {value!r}")
