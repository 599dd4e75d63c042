"""Vision Transformers: the CLIP image tower and timm's ViT, one implementation.

Both are pre-norm transformers over 16x16 (or 14, 32) patches with a class
token and learned position embeddings, and both store attention as one fused
q|k|v projection, which is kept here so published weights map one to one.
They differ in a few switches, set per family by the model zoo:

  CLIP (OpenAI, open_clip)  patch conv without bias, a LayerNorm before the
                            blocks (`ln_pre`), QuickGELU (OpenAI) or GELU,
                            LayerNorm eps 1e-5, final projection `proj`.
  timm                      patch conv with bias, no pre-norm, GELU, eps 1e-6,
                            optional LayerScale (UNI-style `init_values`),
                            class-token or average pooling.

Module names follow timm (`blocks.N.attn.qkv`, `mlp.fc1`, ...). Input sizes
other than `image_size` work: the position embeddings are resampled
(bicubic) to the input's patch grid, as timm's `dynamic_img_size` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's activation
}
POOLS = ("token", "avg")

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
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0] * hd ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
    # Logits and softmax in fp32 even when the trunk runs in bf16.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d))


class MLP(nnx.Module):
  def __init__(self, dim, hidden, act, *, dtype, rngs):
    self.act = act
    self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class LayerScale(nnx.Module):
  """Per-channel residual-branch scale (CaiT), used by UNI-style ViTs."""

  def __init__(self, dim, init_value):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, dim, heads, mlp_dim, act, *, eps, layer_scale, dtype, rngs):
    self.norm1 = layer_norm(dim, eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, layer_scale) if layer_scale else None
    self.norm2 = layer_norm(dim, eps, dtype=dtype, rngs=rngs)
    self.mlp = MLP(dim, mlp_dim, act, dtype=dtype, rngs=rngs)
    self.ls2 = LayerScale(dim, layer_scale) if layer_scale else None

  def __call__(self, x):
    y = self.attn(self.norm1(x))
    x = x + (y if self.ls1 is None else self.ls1(y))
    y = self.mlp(self.norm2(x))
    return x + (y if self.ls2 is None else self.ls2(y))


class VisionTransformer(nnx.Module):
  """Backbone: NHWC image -> pooled embedding [N, num_features]."""

  def __init__(self, *, width: int, layers: int, heads: int, patch: int, image_size: int, mlp_dim: int,
               act: str, ln_eps: float, patch_bias: bool, pre_norm: bool, proj_dim: int = 0,
               layer_scale: float = 0.0, pool: str = "token", dtype=jnp.float32, rngs: nnx.Rngs):
    if act not in ACTIVATIONS:
      raise ValueError(f"model.act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if pool not in POOLS:
      raise ValueError(f"model.pool must be one of {POOLS}, got {pool!r}")
    if image_size % patch:
      raise ValueError(f"model.image_size ({image_size}) must be a multiple of model.patch ({patch})")
    self.patch, self.pool, self.dtype = patch, pool, dtype
    self.grid = image_size // patch
    self.patch_embed = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID", use_bias=patch_bias,
                                kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width)))
    self.pos_embed = nnx.Param(_dense_init(rngs.params(), (1, 1 + self.grid ** 2, width)))
    self.norm_pre = layer_norm(width, ln_eps, dtype=dtype, rngs=rngs) if pre_norm else None
    self.blocks = nnx.List([Block(width, heads, mlp_dim, act, eps=ln_eps, layer_scale=layer_scale,
                                  dtype=dtype, rngs=rngs) for _ in range(layers)])
    self.norm = layer_norm(width, ln_eps, dtype=dtype, rngs=rngs)
    self.proj = dense(width, proj_dim, bias=False, dtype=dtype, rngs=rngs) if proj_dim else None
    self.num_features = proj_dim or width

  def position_embedding(self, gh: int, gw: int):
    """[1, 1 + gh*gw, D]; the patch part resampled when the grid is not the native one."""
    pos = self.pos_embed[...]
    if (gh, gw) == (self.grid, self.grid):
      return pos
    cls, grid = pos[:, :1], pos[:, 1:].reshape(1, self.grid, self.grid, -1)
    grid = jax.image.resize(grid, (1, gh, gw, grid.shape[-1]), "bicubic", antialias=False)
    return jnp.concatenate([cls, grid.reshape(1, gh * gw, -1)], axis=1)

  def tokens(self, x):
    """Final-layer tokens [N, 1 + patches, width], class token first (before the final norm)."""
    n, h, w, _ = x.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"input images {h}x{w} px are not a multiple of model.patch ({self.patch})")
    x = self.patch_embed(x.astype(self.dtype))
    gh, gw = x.shape[1:3]
    cls = jnp.broadcast_to(self.cls_token[...], (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x.reshape(n, gh * gw, -1)], axis=1).astype(jnp.float32)
    x = (x + self.position_embedding(gh, gw)).astype(self.dtype)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    for block in self.blocks:
      x = block(x)
    return x

  def __call__(self, x):
    tokens = self.tokens(x)
    # LayerNorm is per token, so norm-then-pick equals pick-then-norm.
    pooled = self.norm(tokens[:, 0] if self.pool == "token" else jnp.mean(tokens[:, 1:], axis=1))
    return pooled if self.proj is None else self.proj(pooled)
