"""Fine-tune a foundation model on BACH from its imported weights.

    python -m histojax.convert --format timm --preset uni2_h --input UNI2-h/ --output /data/weights/uni2_h
    python -m histojax.train --config configs/finetune_encoder.py:uni2_h,trunk=last_blocks \\
        --config.init_from=/data/weights/uni2_h --workdir /data/runs/uni2_h_ft

A linear projection head (256-d, L2-normalised) on the preset's published feature,
trained with the Multi-Similarity loss on class-balanced batches (`config.finetune`,
histojax/optim.py):
  trunk=frozen       the trunk frozen, the head trained (1000 steps at lr 1e-3): a
                     retrieval probe of the frozen features; no Adam moments for the trunk.
  trunk=last_blocks  also the last `blocks=N` transformer blocks (default 4) and the final
                     norm, at lr 1e-4 with layer-wise decay `decay=` (default 0.75: block i of
                     L learns at lr * 0.75 ** (L + 1 - i)), 1000 steps.
Batches of 64 (4 classes x 16) random 224 crops of the whole photos (or tiles), flips and
rotations, light colour jitter; retrieval on the validation split every 250 steps.
`--config.init_from` is required (a trunk kept frozen, even in part, without weights is
refused), as is the preset first among the variants. Other variants: `dataset=` (as
frozen_encoder.py), `cpu` (float32, small batches).

The ViT-g presets (h_optimus_0/1, prov_gigapath, midnight: 1.1B parameters) run with
`mesh.fsdp=-1`: parameters, gradients and Adam moments split over every device
(histojax/sharding.py), the trunk's weights gathered per step; frozen blocks get no moments.
"""

from configs.common import ENCODER_DATASETS, GIANT_WIDTH, encoder_on_cpu, parse_preset, use_encoder
from histojax.config import base_config, parse_variants
from histojax.data import colour
from histojax.models import presets

TRUNKS = ("frozen", "last_blocks")


def get_config(arg=None):
  v = parse_variants(arg, {**{name: () for name in presets.names()}, "dataset": tuple(ENCODER_DATASETS),
                           "trunk": TRUNKS, "blocks": tuple(str(n) for n in range(1, 41)),
                           "decay": ("0.5", "0.65", "0.75", "0.85", "0.9", "1.0"), "cpu": ()})
  preset = parse_preset(v, "finetune_encoder.py")
  trunk = v.get("trunk", "frozen")
  if trunk == "frozen" and ("blocks" in v or "decay" in v):
    raise ValueError("finetune_encoder.py: blocks= and decay= apply to trunk=last_blocks")
  c = base_config(model=preset.name, objective="multi_similarity")
  use_encoder(c, preset, v.get("dataset", "whole_224_thunder"))
  c.model.embed_dim = 256  # a trained linear projection of the published feature
  c.total_steps, c.log_every = 1000, 25
  c.input.batch_size, c.input.m_per_class = 64, 16  # BACH's 4 classes x 16
  c.augment.view1 = colour.view_defaults(jitter_prob=0.8, brightness=0.2, contrast=0.2, saturation=0.1,
                                         hue=0.02, hed_prob=0.5)
  c.finetune.trunk = trunk
  if trunk == "frozen":
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 50
  else:
    c.finetune.unfrozen_blocks = int(v.get("blocks", "4"))
    c.finetune.layer_decay = float(v.get("decay", "0.75"))
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-4, 100
  c.optimizer.weight_decay = 0.05 if trunk == "last_blocks" else 1e-4
  c.checkpoint.every_steps = 250
  if c.eval.during.query_split:
    c.eval.every_steps = 250
  if preset.architecture["width"] >= GIANT_WIDTH:
    c.mesh.data, c.mesh.fsdp = 1, -1
  if "cpu" in v:
    encoder_on_cpu(c)
    c.input.batch_size, c.input.m_per_class = 16, 4
  return c
