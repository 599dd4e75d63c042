"""CGD on BACH: combination of multiple global descriptors (Jun et al., 2019).

ResNet-50 without its last downsampling, SPoC + MAC + GeM descriptors each
projected to 512 and L2-normalised, concatenated (1536-d); batch-hard
triplet loss (margin 0.1) plus temperature-scaled (0.5), label-smoothed (0.1)
cross-entropy on an auxiliary classifier over the first descriptor.

    python -m histojax.train --config configs/bach_cgd.py --workdir gs://BUCKET/bach_cgd

Variants: cpu (~12 min on 2 cores, from the step rate), cpu_x5 (BACH at 5x, 64 px tiles, 450
steps: the recipe measured on held-out patients, see the README), quickstart (synthetic, ~1 min),
tiny (tests).
"""

from histojax.config import bach_on_cpu, base_config, parse_variants, shrink_to_synthetic, use_bach
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "cpu_x5": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="cgd", head="cgd")
  use_bach(c)
  c.total_steps = 6000
  c.input.batch_size, c.input.m_per_class = 256, 64
  c.model.depth, c.model.last_stride = 50, 1  # CGD keeps stage 4 at stage 3's resolution
  c.model.embed_dim = 1536
  c.model.head.descriptors = "SMG"
  c.model.head.num_classes = -1  # the dataset's
  c.augment.view1 = colour.view_defaults(jitter_prob=0.8, brightness=0.2, contrast=0.2, saturation=0.1,
                                         hue=0.02, hed_prob=0.5)
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "adamw", 1e-4, 300
  c.checkpoint.every_steps = 1000

  if "cpu" in v or "cpu_x5" in v:
    bach_on_cpu(c)
    c.total_steps = 1500
    c.input.batch_size, c.input.m_per_class = 32, 8
    c.input.crop, c.input.crop_scale_min = "random_resized", 0.25
    c.input.image_size = 112
    c.model.embed_dim = 384
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 100
  if "cpu_x5" in v:
    # Measured on held-out patients (README, "BACH on patients it has never seen"): 5x context
    # in 64 px tiles seen at one scale in training and search (crops keep >= 64% of the tile,
    # search takes all of it), strong colour and HED jitter, 450 steps.
    c.dataset.name = "bach/x5_64"
    c.input.image_size, c.input.crop_scale_min = 64, 0.64
    c.total_steps, c.optimizer.warmup_steps, c.checkpoint.every_steps = 450, 50, 150
    c.augment.view1 = colour.view_defaults(jitter_prob=0.8, brightness=0.25, contrast=0.25, saturation=0.25,
                                           hue=0.05, hed_prob=0.8, hed_scale=0.2, grayscale_prob=0.1)
  for size in ("quickstart", "tiny"):
    if size in v:
      shrink_to_synthetic(c, size)
      c.optimizer.lr = 2e-3
      c.model.embed_dim = 48 if size == "tiny" else 192
  return c
