"""BYOL on BACH: self-supervised features, no labels used for training.

ResNet-50 trunk; projector 4096 -> 256 and predictor 4096 -> 256; target
network an EMA of the online one (decay 0.996 -> 1, cosine); two views with
BYOL's asymmetric colour recipe plus HED stain jitter; LARS with warmup and
cosine decay. The retrieval embedding is the trunk's pooled features. A
linear probe on stop-gradient features reports label accuracy for
monitoring (labels never reach the trunk).

    python -m histojax.train --config configs/bach_byol.py --workdir gs://BUCKET/bach_byol

For the pair-query task (unlabelled patches + query pairs) use
`configs/pair_query_byol.py`. Variants: cpu (~12 min on 2 cores, from the step rate),
quickstart (synthetic, ~2 min), tiny (tests).
"""

from configs.common import bach_on_cpu, synthetic_sizes, use_bach
from histojax.config import base_config, parse_variants
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="byol", head="byol")
  use_bach(c)
  c.total_steps = 20000
  c.input.sampler = "shuffle"  # self-supervised: no class balancing
  c.input.batch_size = 512
  c.input.crop, c.input.crop_scale_min = "random_resized", 0.2  # tiles, not photos: keep context
  c.augment.view1, c.augment.view2 = colour.byol_views()
  c.model.depth, c.model.embed_dim = 50, 0
  c.model.head.probe_classes = -1  # monitoring only
  c.optimizer.name, c.optimizer.lr = "lars", 0.2 * 512 / 256  # BYOL's base lr scaled by batch/256
  c.optimizer.weight_decay, c.optimizer.warmup_steps = 1.5e-6, 1000
  c.checkpoint.every_steps = 2000

  if "cpu" in v:
    bach_on_cpu(c)
    c.total_steps = 1000
    c.input.batch_size, c.input.image_size = 32, 96
    c.model.head.projector_hidden, c.model.head.predictor_hidden = 512, 512
    c.model.head.projector_dim = 128
    c.optimizer.lr, c.optimizer.warmup_steps = 0.2 * 32 / 256, 50
  for size in synthetic_sizes(c, v, lr=None):
    c.input.sampler = "shuffle"
    c.model.embed_dim = 0
    hidden = 64 if size == "tiny" else 512
    c.model.head.projector_hidden = c.model.head.predictor_hidden = hidden
    c.model.head.projector_dim = 16 if size == "tiny" else 128
    c.optimizer.lr = 0.2 * c.input.batch_size / 256
  return c
