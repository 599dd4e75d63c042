"""The same networks and training step in PyTorch, the yardstick for `bench.train_step --against torch`.

Optional: needs `pip install -r requirements-bench.txt` (torch CPU); histojax
never imports it. Written here to mirror histojax's models layer for layer,
so the parameter counts agree (`parameter_count` against
`histojax.models.parameter_count`, checked by tests/test_torch_reference.py):

- ResNet-18/34/50 (torchvision v1.5: stride on the 3x3), optionally with
  squeeze-excitation in every block (timm's `seresnet`: SE on the residual
  branch before the sum, 1x1 convs with bias, reduction 16);
- the mixed-attention SE-ResNet (Yang et al., BIBM 2019): stage 3's output
  gated by sigmoid(BN(1x1 conv(SE blocks at stride 1))) before stage 4;
- the linear embedding head + L2, the Multi-Similarity loss with its pair
  mining (as `histojax.objectives.metric.multi_similarity_loss`), and SGD with
  momentum 0.9 and weight decay.

The step takes uint8 NHWC images like histojax's (normalisation inside), so
both sides time the same work from the same batch. Colour augmentation is
not in it: the reference implementation jitters colour in its data loader.
"""

from __future__ import annotations

import torch
from torch import nn

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


def _conv(cin, cout, k, stride=1, bias=False):
  return nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)


class SqueezeExcite(nn.Module):
  def __init__(self, c, reduction):
    super().__init__()
    hidden = max(1, c // reduction)
    self.fc1, self.fc2 = _conv(c, hidden, 1, bias=True), _conv(hidden, c, 1, bias=True)

  def forward(self, x):
    return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""

  def __init__(self, kind, cin, width, stride, se_reduction):
    super().__init__()
    self.expansion = 1 if kind == "basic" else 4
    cout = width * self.expansion
    if kind == "basic":
      layers = [_conv(cin, width, 3, stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                _conv(width, cout, 3), nn.BatchNorm2d(cout)]
    else:
      layers = [_conv(cin, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                _conv(width, width, 3, stride), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                _conv(width, cout, 1), nn.BatchNorm2d(cout)]
    self.residual = nn.Sequential(*layers)
    self.se = SqueezeExcite(cout, se_reduction) if se_reduction else None
    self.downsample = (nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else None)

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.residual(x)
    if self.se is not None:
      out = self.se(out)
    return torch.relu(out + shortcut)


def _stage(kind, cin, width, blocks, stride, se_reduction):
  expansion = 1 if kind == "basic" else 4
  layers = []
  for i in range(blocks):
    layers.append(Block(kind, cin, width, stride if i == 0 else 1, se_reduction))
    cin = width * expansion
  return nn.Sequential(*layers)


class Embedder(nn.Module):
  """Backbone (resnet | se_resnet | mixed_attention) + linear embedding + L2."""

  def __init__(self, backbone: str, depth: int = 50, width: float = 1.0, embed_dim: int = 512):
    super().__init__()
    kind, counts = STAGES[depth]
    expansion = 1 if kind == "basic" else 4
    se = 0 if backbone == "resnet" else 16
    widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    self.stem = nn.Sequential(_conv(3, widths[0], 7, 2), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                              nn.MaxPool2d(3, 2, 1))
    cin, stages = widths[0], []
    for w, n, s in zip(widths, counts, (1, 2, 2, 2)):
      stages.append(_stage(kind, cin, w, n, s, se))
      cin = w * expansion
    self.stage1_3, self.stage4 = nn.Sequential(*stages[:3]), stages[3]
    self.mask = None
    if backbone == "mixed_attention":
      c3 = widths[2] * expansion
      self.mask = nn.Sequential(_stage(kind, c3, widths[3], counts[3], 1, se),
                                _conv(widths[3] * expansion, c3, 1), nn.BatchNorm2d(c3), nn.Sigmoid())
    self.proj = nn.Linear(cin, embed_dim) if embed_dim else None

  def forward(self, images_nhwc_uint8):
    x = images_nhwc_uint8.permute(0, 3, 1, 2).float()
    x = (x - _MEAN.to(x.device)) / _STD.to(x.device)
    x = self.stage1_3(self.stem(x))
    if self.mask is not None:
      x = x * self.mask(x)
    x = self.stage4(x).mean((2, 3))
    if self.proj is not None:
      x = self.proj(x)
    return nn.functional.normalize(x, dim=1)


def _log1p_sum_exp(x, mask):
  x = torch.where(mask, x, torch.full_like(x, -torch.inf))
  top = torch.clamp(x.max(1).values, min=0.0)
  total = torch.exp(-top) + torch.where(mask, torch.exp(x - top[:, None]), torch.zeros_like(x)).sum(1)
  return top + torch.log(total)


def multi_similarity_loss(emb, labels, alpha=2.0, beta=5.0, base=0.5, epsilon=0.1):
  """The Multi-Similarity loss exactly as histojax's (pair mining, inactive anchors give 0)."""
  sim = emb @ emb.T
  n = sim.shape[0]
  same = labels[:, None] == labels[None, :]
  pos = same & ~torch.eye(n, dtype=torch.bool, device=sim.device)
  neg = ~same
  hardest_pos = torch.where(pos, sim, torch.full_like(sim, torch.inf)).min(1, keepdim=True).values
  hardest_neg = torch.where(neg, sim, torch.full_like(sim, -torch.inf)).max(1, keepdim=True).values
  neg_kept = neg & (sim + epsilon > hardest_pos)
  pos_kept = pos & (sim - epsilon < hardest_neg)
  pos_term = _log1p_sum_exp(-alpha * (sim - base), pos_kept) / alpha
  neg_term = _log1p_sum_exp(beta * (sim - base), neg_kept) / beta
  active = pos_kept.any(1) & neg_kept.any(1)
  return torch.where(active, pos_term + neg_term, torch.zeros_like(pos_term)).sum() / n


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def make_step(model: nn.Module, lr: float = 0.01, channels_last: bool = False,
              autocast: torch.dtype | None = None):
  """A closure running one SGD update on (uint8 NHWC images, int labels); returns the loss.

  The model may live on a GPU (images and labels must be on its device). `autocast` (e.g.
  torch.bfloat16) runs the network in that precision, as AMP training does; the loss is
  computed in float32 either way.
  """
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
  device_type = next(model.parameters()).device.type
  model.train()

  def step(images, labels):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
      embeddings = model(images)
    loss = multi_similarity_loss(embeddings.float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step
