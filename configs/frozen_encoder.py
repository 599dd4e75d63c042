"""Search with a frozen foundation model: imported weights, no training.

    python -m histojax.convert --format timm --preset uni2_h --input UNI2-h/ --output /data/weights/uni2_h
    python -m histojax.train --config configs/frozen_encoder.py:uni2_h \\
        --config.init_from=/data/weights/uni2_h --workdir /data/runs/uni2_h_bach

The model is the preset (`histojax.models.presets`) with its published feature
(embed_dim 0: the class token, class token + patch mean or pooler output,
L2-normalised for cosine search); `total_steps=0` saves the imported weights as
step 0, then exports the gallery and query splits, indexes the gallery and scores
retrieval, THUNDER's majority votes included (`thunder/*@k` in eval/metrics.json),
with the report. `search` and `serve` then answer on `<workdir>/index`.
`--config.init_from` is required: the folder `convert --preset NAME` wrote (its
depth and widths replace the preset's where they differ).

Variants, after the preset: `dataset=` one of configs.common.ENCODER_DATASETS
(default whole_224_thunder: whole photos resized to 224, THUNDER's split, gallery
train, queries test; whole_224_eva: eva's split, queries its validation photos;
default: 224 px tiles at 20x, the presets' magnification; x10_256), `feature=`
another of the preset's features (e.g. token for Midnight's class token only),
`cpu` (float32, small batches).
"""

from configs.common import ENCODER_DATASETS, encoder_on_cpu, parse_preset, use_encoder
from histojax.config import base_config, parse_variants
from histojax.models import presets

FEATURES = tuple(sorted({f for p in presets.PRESETS.values() for f in (p.feature, *p.features)}))


def get_config(arg=None):
  v = parse_variants(arg, {**{name: () for name in presets.names()}, "dataset": tuple(ENCODER_DATASETS),
                           "feature": FEATURES, "cpu": ()})
  preset = parse_preset(v, "frozen_encoder.py")
  c = base_config(model=preset.name)
  use_encoder(c, preset, v.get("dataset", "whole_224_thunder"))
  c.model.pool = preset.model_fields(v.get("feature") or None)["pool"]  # refuses a feature the card does not offer
  c.total_steps = 0
  # Frozen: the optimizer holds no moments for the trunk, so the step-0 checkpoint is the weights alone.
  c.finetune.trunk = "frozen"
  c.input.batch_size, c.input.m_per_class = 64, 16  # never drawn (no step); valid for BACH's 4 classes
  if "cpu" in v:
    encoder_on_cpu(c)
  return c
