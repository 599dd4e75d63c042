"""Deep metric learning on BACH: the liver-retrieval reference (Yang et al., BIBM 2019).

Mixed-attention SE-ResNet-50 (SE in every block + a spatial mask branch after
stage 3), 512-d L2 embedding, Multi-Similarity loss on m-per-class batches.

    python -m histojax.prepare --dataset bach --manual_dir ~/data/BACH        # once
    python -m histojax.convert --format torchvision_resnet --input se_resnet50.safetensors \\
        --output ~/weights/se_resnet50 --model mixed_attention --allow_missing mask_   # optional
    python -m histojax.train --config configs/bach_dml.py --workdir gs://BUCKET/bach_dml \\
        [--config.init_from ~/weights/se_resnet50]

Variants (comma-separated, e.g. `configs/bach_dml.py:cpu,loss=abe`):
  loss=multi_similarity|contrastive|triplet|abe   the reference loss and its baselines (abe
                                                  implies the ABE-M model)
  backbone=mixed_attention|se_resnet|resnet       the reference model and its baselines
  cpu         BACH at 10x (256 px tiles), ResNet-18-sized trunk at 112 px: 18.7 min on 2 cores (measured, 1500 steps);
              validation retrieval logged every 250 steps as during/* (2.3% of the run, measured)
  quickstart  the synthetic smoke data at quickstart size (~1 min)
  tiny        seconds; used by tests
"""

from configs.common import supervised_bach, supervised_bach_on_cpu, synthetic_sizes
from histojax.config import base_config, parse_variants

LOSSES = ("multi_similarity", "contrastive", "triplet", "abe")
BACKBONES = ("mixed_attention", "se_resnet", "resnet")


def get_config(arg=None):
  v = parse_variants(arg, {"loss": LOSSES, "backbone": BACKBONES, "cpu": (), "quickstart": (), "tiny": ()})
  loss = v.get("loss", "multi_similarity")
  c = base_config(model="abe" if loss == "abe" else v.get("backbone", "mixed_attention"), objective=loss)

  supervised_bach(c)
  c.model.embed_dim = 512

  if "cpu" in v:
    supervised_bach_on_cpu(c)
  synthetic_sizes(c, v, embed_dim={"quickstart": 128, "tiny": 32})
  if loss == "abe":
    c.model.num_learners = 2 if "tiny" in v else 4
  return c
