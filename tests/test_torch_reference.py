"""The PyTorch yardstick has histojax's networks (same parameter counts) and loss (same value).

Skipped where torch is not installed (CI: torch is an optional bench extra)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import torch_reference  # noqa: E402
from histojax import models  # noqa: E402
from histojax.objectives import metric  # noqa: E402


@pytest.mark.parametrize("backbone", ["resnet", "se_resnet", "mixed_attention"])
@pytest.mark.parametrize("depth,width", [(50, 1.0), (18, 0.5)])
def test_parameter_counts_match_histojax(backbone, depth, width):
  cfg = models.model_config(backbone)
  cfg.depth, cfg.width, cfg.embed_dim = depth, width, 512
  ours = models.parameter_count(models.abstract_model(cfg))
  assert torch_reference.parameter_count(torch_reference.Embedder(backbone, depth, width, 512)) == ours


def test_multi_similarity_loss_matches_histojax():
  r = np.random.default_rng(0)
  emb = r.normal(size=(16, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.repeat(np.arange(4), 4)
  ours, _ = metric.multi_similarity_loss(emb, labels)
  theirs = torch_reference.multi_similarity_loss(torch.from_numpy(emb), torch.from_numpy(labels))
  np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)


def test_step_trains():
  model = torch_reference.Embedder("resnet", 18, 0.25, 16)
  step = torch_reference.make_step(model, lr=0.05)
  images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
  labels = torch.arange(2).repeat_interleave(4)
  first = float(step(images, labels))
  for _ in range(5):
    last = float(step(images, labels))
  assert last < first
