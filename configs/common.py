"""Presets the method configs share: where the data is and at what scale.

Kept beside the configs, not in the schema (`histojax.config`), as big_vision
keeps its `configs/common.py`: a preset is an experiment choice, the schema
only says which fields exist. Each preset edits a config in place.
"""

import ml_collections

from histojax.data import colour
from histojax.models import presets

SYNTHETIC_SIZES = ("quickstart", "tiny")


def shrink_to_synthetic(c: ml_collections.ConfigDict, size: str) -> None:
  """Points a config at the synthetic smoke data and shrinks it to CPU scale.

  "quickstart": synthetic_tissue, 56 px crops, quarter-width ResNet-18-sized
  trunks, 400 steps (about a minute on 2 cores). "tiny": the 4-step test size.
  Method-specific fields (heads, codebooks) are the config file's business.
  """
  tiny = size == "tiny"
  c.dataset.name = "synthetic_tissue/tiny" if tiny else "synthetic_tissue"
  c.dataset.train_split, c.dataset.gallery_split, c.dataset.query_split = "train", "train", "test"
  c.init_from = ""
  c.total_steps, c.log_every = (4, 2) if tiny else (400, 20)
  c.input.batch_size, c.input.m_per_class = (24, 4) if tiny else (48, 8)  # 6 classes x m
  c.input.image_size = 48 if tiny else 56
  c.input.eval_batch_size = 32 if tiny else 128
  c.input.num_workers = 0
  if "depth" in c.model:
    c.model.depth, c.model.width = 18, 0.125 if tiny else 0.25
  c.model.dtype = "float32"
  c.optimizer.warmup_steps = 1 if tiny else 40
  c.checkpoint.every_steps = 2 if tiny else 100
  c.checkpoint.max_to_keep = 2
  c.mesh.data = -1
  c.eval.every_steps, c.eval.during.query_split = 0, ""  # the synthetic set has no validation split


def synthetic_sizes(c: ml_collections.ConfigDict, variants: dict, embed_dim: dict[str, int] | None = None,
                    lr: float | None = 2e-3) -> list[str]:
  """`shrink_to_synthetic` for each of the `quickstart`/`tiny` variants chosen, then the
  settings the methods share at that size: `embed_dim[size]` and the learning rate.

  Returns the sizes applied, in order, so a config can add fields of its own method.
  """
  applied = [size for size in SYNTHETIC_SIZES if size in variants]
  for size in applied:
    shrink_to_synthetic(c, size)
    if lr is not None:
      c.optimizer.lr = lr
    if embed_dim is not None:
      c.model.embed_dim = embed_dim[size]
  return applied


def use_bach(c: ml_collections.ConfigDict) -> None:
  """Points a method config at BACH at accelerator scale: `bach/default` (224 px
  tiles at 20x, split per photo), gallery train, queries test, bf16 compute."""
  c.dataset.name = "bach/default"
  c.dataset.gallery_split, c.dataset.query_split = "train", "test"
  c.input.image_size, c.input.eval_batch_size = 224, 512
  c.model.dtype = "bfloat16"
  c.eval.ks = (1, 5, 10, 20)
  # Retrieval on validation while training (histojax/evaluators.py): 2048 train tiles and 256
  # validation tiles are ~4.5 eval batches, the forward passes of ~3 training steps of 256 tiles
  # (forward + backward ~3x a forward): ~0.6% of the run at every 500 steps (estimated, not measured).
  c.eval.every_steps, c.eval.during.query_split = 500, "validation"


def bach_on_cpu(c: ml_collections.ConfigDict) -> None:
  """The CPU scale of a BACH config: `bach/x10_256` (256 px tiles at 10x, 1561
  train tiles) and a half-width ResNet-18-sized trunk in fp32. The method config
  then sets crop size, batch and steps so the run fits well inside 30 min on 2 cores."""
  c.dataset.name = "bach/x10_256"
  c.log_every, c.input.eval_batch_size = 25, 64
  c.model.depth, c.model.width, c.model.dtype = 18, 0.5, "float32"
  c.checkpoint.every_steps = 250
  # Retrieval on validation while training: 512 train tiles against all 231 validation tiles,
  # every 250 steps. On bach_dml.py:cpu that took 3.1% of the run's wall time idle (6 evaluations
  # of 4-5 s; bench/results/eval_during_training.json), 2.3% on a loaded machine (11-20 s each).
  c.eval.every_steps, c.eval.during.gallery_rows = 250, 512


def supervised_bach(c: ml_collections.ConfigDict) -> None:
  """`use_bach` plus what the label-supervised methods (DML, CGD) share at accelerator
  scale: 6000 steps of 64 tiles x 4 classes, light colour and stain jitter (slides differ
  in staining, not in hue identity), AdamW at 1e-4 after 300 warmup steps."""
  use_bach(c)
  c.total_steps = 6000
  c.input.batch_size, c.input.m_per_class = 256, 64  # BACH has 4 classes: 4 x 64
  c.augment.view1 = colour.view_defaults(jitter_prob=0.8, brightness=0.2, contrast=0.2, saturation=0.1,
                                         hue=0.02, hed_prob=0.5)
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "adamw", 1e-4, 300
  c.checkpoint.every_steps = 1000


def supervised_bach_on_cpu(c: ml_collections.ConfigDict) -> None:
  """`bach_on_cpu` plus the schedule the label-supervised methods (DML, CGD) share
  there: 1500 steps of 8 tiles x 4 classes, 112 px random-resized crops of 25-100%."""
  bach_on_cpu(c)
  c.total_steps = 1500
  c.input.batch_size, c.input.m_per_class = 32, 8
  c.input.crop, c.input.crop_scale_min = "random_resized", 0.25
  c.input.image_size = 112
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 100


# BACH as an imported encoder is scored on: variant -> (dataset, query split, validation split).
ENCODER_DATASETS = {
    # THUNDER's split (train 218 / validation 50 / test 132 photos), whole photos resized to 224 on
    # the short side: the frozen-feature protocol of THUNDER (k-NN, linear probe) and eva.
    "whole_224_thunder": ("bach/whole_224_thunder", "test", "validation"),
    # eva's split (train 268 / validation 132): eva reports on its validation photos.
    "whole_224_eva": ("bach/whole_224_eva", "validation", ""),
    # Tiles at the presets' magnification: 224 px at 20x (0.42 um/px against their 0.5), split by
    # blocks of photo numbers; queries are photos voted over their tiles.
    "default": ("bach/default", "test", "validation"),
    "x10_256": ("bach/x10_256", "test", "validation"),  # 10x, 256 px tiles centre-cropped to 224
}
# ViT-g presets (1.1B parameters): fine-tuning splits parameters and Adam moments over every device.
GIANT_WIDTH = 1536


def parse_preset(variants: dict, file: str) -> presets.Preset:
  """The one preset named among a config's variants (`frozen_encoder.py:uni2_h,...`)."""
  named = [name for name in variants if name in presets.PRESETS]
  if len(named) != 1:
    raise ValueError(f"{file} takes exactly one preset among its variants ({', '.join(presets.names())}), "
                     f"got {named or 'none'}")
  return presets.get(named[0])


def use_encoder(c: ml_collections.ConfigDict, preset: presets.Preset, dataset: str) -> None:
  """Points a config at an imported foundation model on BACH: the preset's architecture (its
  converted weights come from `--config.init_from`, required), its input size, bf16 compute,
  the dataset variant's splits, THUNDER's ks."""
  name, query_split, validation = ENCODER_DATASETS[dataset]
  c.dataset.name, c.dataset.gallery_split, c.dataset.query_split = name, "train", query_split
  c.dataset.train_split = "train"
  c.init_from = ""  # --config.init_from=DIR: the folder `convert --preset NAME` wrote
  c.input.image_size = preset.input_size
  c.input.eval_batch_size = 64
  # Parameters stay float32. bf16 features of the 2-block parity models keep cosine >= 0.99997 to the
  # reference (bench/results/encoder_parity.json); at full depth that is not measured here.
  c.model.dtype = "bfloat16"
  c.eval.ks = (1, 3, 5, 10, 20)  # THUNDER's majority votes at 1, 3, 5, 10 (eval/metrics.json thunder/*)
  c.eval.every_steps = 0
  c.eval.during.query_split = validation


def encoder_on_cpu(c: ml_collections.ConfigDict) -> None:
  """An imported encoder on a CPU: float32 (bf16 is emulated there, slower) and small eval batches."""
  c.model.dtype = "float32"
  c.input.eval_batch_size = 16
