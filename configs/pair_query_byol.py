"""BYOL for the pair-query task: are two unlabelled patches of the same class?

Trains BYOL (see configs/bach_byol.py) on the task's unlabelled training
patches, then answers every query pair by thresholding the cosine similarity
of the two patches' embeddings, the threshold chosen on the labelled
validation pairs. Writes `<workdir>/eval/pair_answers.csv` and reports the
c-index (correct decisions / pairs) held out on the validation pairs; the
reference result on the original task is 87.58%.

    python -m histojax.prepare --dataset pair_query --manual_dir ~/data/pair_task
    python -m histojax.train --config configs/pair_query_byol.py --workdir gs://BUCKET/pairs_byol

Variants: cpu (~12 min on 2 cores, from the step rate), tiny (tests).
"""

from configs.common import shrink_to_synthetic
from histojax.config import base_config, parse_variants
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "tiny": ()})
  c = base_config(model="resnet", objective="byol", head="byol")
  c.dataset.name = "pair_query"
  c.dataset.train_split, c.dataset.gallery_split, c.dataset.query_split = "train", "train", "test"
  c.total_steps = 20000
  c.input.sampler = "shuffle"
  c.input.batch_size, c.input.image_size, c.input.eval_batch_size = 512, 224, 512
  c.input.crop, c.input.crop_scale_min = "random_resized", 0.2
  c.augment.view1, c.augment.view2 = colour.byol_views()
  c.model.depth, c.model.embed_dim, c.model.dtype = 50, 0, "bfloat16"
  c.optimizer.name, c.optimizer.lr = "lars", 0.2 * 512 / 256
  c.optimizer.weight_decay, c.optimizer.warmup_steps = 1.5e-6, 1000
  c.checkpoint.every_steps = 2000

  if "cpu" in v:
    c.total_steps, c.log_every = 1000, 25
    c.input.batch_size, c.input.image_size, c.input.eval_batch_size = 32, 64, 64
    c.model.depth, c.model.width, c.model.dtype = 18, 0.5, "float32"
    c.model.head.projector_hidden = c.model.head.predictor_hidden = 512
    c.model.head.projector_dim = 128
    c.optimizer.lr, c.optimizer.warmup_steps = 0.2 * 32 / 256, 50
    c.checkpoint.every_steps = 250
  if "tiny" in v:
    shrink_to_synthetic(c, "tiny")
    c.dataset.name = "pair_query"  # the task's own data, not the synthetic set
    c.dataset.query_split = "test"
    c.input.sampler, c.input.batch_size, c.input.eval_batch_size = "shuffle", 16, 16
    c.model.embed_dim = 0
    c.model.head.projector_hidden = c.model.head.predictor_hidden = 64
    c.model.head.projector_dim = 16
    c.optimizer.lr = 0.2 * 16 / 256
  return c
