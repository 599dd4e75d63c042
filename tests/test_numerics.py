"""A ResNet bottleneck and a ViT block against plain numpy written from the published definitions."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from histojax.models import heads, resnet, vit


def conv2d_nchw(x, w, stride=1, padding=0):
  """torch.nn.functional.conv2d: x [N, I, H, W], w [O, I, kh, kw] (cross-correlation)."""
  o, _, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], o, ho, wo))
  for dy in range(kh):
    for dx in range(kw):
      patch = x[:, :, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]
      out += np.einsum("nihw,oi->nohw", patch, w[:, :, dy, dx])
  return out


def batch_norm_eval(x, p, eps=1e-5):
  shape = (1, -1, 1, 1)
  return ((x - p["running_mean"].reshape(shape)) / np.sqrt(p["running_var"].reshape(shape) + eps)
          * p["weight"].reshape(shape) + p["bias"].reshape(shape))


def relu(x):
  return np.maximum(x, 0)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def se_bottleneck_reference(x, p, stride):
  """torchvision Bottleneck (stride on the 3x3) with timm's SE before the residual sum."""
  out = relu(batch_norm_eval(conv2d_nchw(x, p["conv1"]), p["bn1"]))
  out = relu(batch_norm_eval(conv2d_nchw(out, p["conv2"], stride, 1), p["bn2"]))
  out = batch_norm_eval(conv2d_nchw(out, p["conv3"]), p["bn3"])
  s = out.mean(axis=(2, 3), keepdims=True)
  s = sigmoid(conv2d_nchw(relu(conv2d_nchw(s, p["se.fc1"]) + p["se.fc1.b"].reshape(1, -1, 1, 1)),
                          p["se.fc2"]) + p["se.fc2.b"].reshape(1, -1, 1, 1))
  shortcut = batch_norm_eval(conv2d_nchw(x, p["down.conv"], stride), p["down.bn"])
  return relu(out * s + shortcut)


def _bn_params(rng, c):
  return {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.1, c),
          "running_mean": rng.normal(0, 0.1, c), "running_var": rng.uniform(0.5, 1.5, c)}


def _set_bn(bn, p):
  bn.scale[...], bn.bias[...] = jnp.asarray(p["weight"]), jnp.asarray(p["bias"])
  bn.mean[...], bn.var[...] = jnp.asarray(p["running_mean"]), jnp.asarray(p["running_var"])


def _set_conv(conv, w, b=None):
  conv.kernel[...] = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO
  if b is not None:
    conv.bias[...] = jnp.asarray(b)


def test_se_bottleneck_matches_numpy_reference():
  rng = np.random.default_rng(0)
  cin, width, stride = 8, 4, 2
  cout = 4 * width
  p = {"conv1": rng.normal(0, 0.3, (width, cin, 1, 1)), "conv2": rng.normal(0, 0.3, (width, width, 3, 3)),
       "conv3": rng.normal(0, 0.3, (cout, width, 1, 1)), "se.fc1": rng.normal(0, 0.3, (cout // 4, cout, 1, 1)),
       "se.fc1.b": rng.normal(0, 0.1, cout // 4), "se.fc2": rng.normal(0, 0.3, (cout, cout // 4, 1, 1)),
       "se.fc2.b": rng.normal(0, 0.1, cout), "down.conv": rng.normal(0, 0.3, (cout, cin, 1, 1)),
       "bn1": _bn_params(rng, width), "bn2": _bn_params(rng, width), "bn3": _bn_params(rng, cout),
       "down.bn": _bn_params(rng, cout)}
  block = resnet.Bottleneck(cin, width, stride, se_reduction=4, dtype=jnp.float32, rngs=nnx.Rngs(0))
  for name in ("conv1", "conv2", "conv3"):
    _set_conv(getattr(block, name), p[name])
  _set_conv(block.se.fc1, p["se.fc1"], p["se.fc1.b"])
  _set_conv(block.se.fc2, p["se.fc2"], p["se.fc2.b"])
  _set_conv(block.downsample.conv, p["down.conv"])
  for name in ("bn1", "bn2", "bn3"):
    _set_bn(getattr(block, name), p[name])
  _set_bn(block.downsample.bn, p["down.bn"])
  block.eval()

  x = rng.normal(0, 1, (2, cin, 9, 9))  # odd size: checks the padding of the strided 3x3
  got = np.asarray(block(jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)))
  want = np.transpose(se_bottleneck_reference(x, p, stride), (0, 2, 3, 1))
  assert got.shape == (2, 5, 5, cout)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def vit_block_reference(x, p, heads, act, eps, gamma):
  """Pre-norm block with torch.nn.MultiheadAttention's fused in_proj ([3D, D], q|k|v)."""
  n, t, d = x.shape
  hd = d // heads
  y = layer_norm(x, p["ln1.w"], p["ln1.b"], eps)
  qkv = y @ p["in_proj_weight"].T + p["in_proj_bias"]
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(n, t, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
  attn = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)) @ v
  y = attn.transpose(0, 2, 1, 3).reshape(n, t, d) @ p["out_proj.w"].T + p["out_proj.b"]
  x = x + gamma[0] * y
  y = layer_norm(x, p["ln2.w"], p["ln2.b"], eps) @ p["fc1.w"].T + p["fc1.b"]
  y = y * sigmoid(1.702 * y) if act == "quick_gelu" else 0.5 * y * (1 + erf(y / np.sqrt(2)))
  return x + gamma[1] * (y @ p["fc2.w"].T + p["fc2.b"])


@pytest.mark.parametrize("act,layer_scale,eps", [("quick_gelu", 0.0, 1e-5), ("gelu", 0.3, 1e-6)])
def test_vit_block_matches_numpy_reference(act, layer_scale, eps):
  rng = np.random.default_rng(1)
  d, heads_, mlp = 12, 3, 20
  p = {"ln1.w": rng.uniform(0.5, 1.5, d), "ln1.b": rng.normal(0, 0.1, d),
       "in_proj_weight": rng.normal(0, 0.3, (3 * d, d)), "in_proj_bias": rng.normal(0, 0.1, 3 * d),
       "out_proj.w": rng.normal(0, 0.3, (d, d)), "out_proj.b": rng.normal(0, 0.1, d),
       "ln2.w": rng.uniform(0.5, 1.5, d), "ln2.b": rng.normal(0, 0.1, d),
       "fc1.w": rng.normal(0, 0.3, (mlp, d)), "fc1.b": rng.normal(0, 0.1, mlp),
       "fc2.w": rng.normal(0, 0.3, (d, mlp)), "fc2.b": rng.normal(0, 0.1, d)}
  gamma = rng.uniform(0.5, 1.5, (2, d)) if layer_scale else np.ones((2, d))
  block = vit.Block(d, heads_, mlp, act, eps=eps, layer_scale=layer_scale, dtype=jnp.float32, rngs=nnx.Rngs(0))
  for norm, key in ((block.norm1, "ln1"), (block.norm2, "ln2")):
    norm.scale[...], norm.bias[...] = jnp.asarray(p[f"{key}.w"]), jnp.asarray(p[f"{key}.b"])
  for lin, key in ((block.attn.proj, "out_proj"), (block.mlp.fc1, "fc1"), (block.mlp.fc2, "fc2")):
    lin.kernel[...], lin.bias[...] = jnp.asarray(p[f"{key}.w"].T), jnp.asarray(p[f"{key}.b"])
  block.attn.qkv.kernel[...] = jnp.asarray(p["in_proj_weight"].T)
  block.attn.qkv.bias[...] = jnp.asarray(p["in_proj_bias"])
  if layer_scale:
    block.ls1.gamma[...], block.ls2.gamma[...] = jnp.asarray(gamma[0]), jnp.asarray(gamma[1])

  x = rng.normal(0, 1, (2, 5, d))
  got = np.asarray(block(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, vit_block_reference(x, p, heads_, act, eps, gamma), rtol=1e-4, atol=1e-5)


def test_global_descriptors_match_numpy():
  fmap = np.random.default_rng(2).uniform(0, 2, (2, 3, 4, 5)).astype(np.float32)
  head = heads.CGDHead(5, 6, descriptors="SMG", gem_p=3.0, rngs=nnx.Rngs(0))
  x = jnp.asarray(fmap)
  np.testing.assert_allclose(head.pool("S", x), fmap.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(head.pool("M", x), fmap.max(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(head.pool("G", x), np.cbrt((fmap ** 3).mean(axis=(1, 2))), rtol=1e-5)
