"""The full training config tree and its checks.

Experiment files in configs/ start from `base_config(...)` and change fields;
the tree comes back locked, so assigning a field that does not exist (in the
file or with `--config.a.b=...`) raises at once and names the field.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from etils import epath

from histojax import indexing, models, objectives, optim, sharding, untrusted
from histojax.data import colour
from histojax.weights import store as weights_store


def base_config(model: str = "resnet", objective: str = "multi_similarity",
                head: str | None = None) -> ml_collections.ConfigDict:
  """The locked tree for `model` (with `head`, default the model's own) and `objective`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000  # 0 with init_from: evaluate the imported weights without training
  c.log_every = 10
  # Weights to start from when the workdir has no checkpoint yet: a folder
  # written by `python -m histojax.convert` (published backbones).
  c.init_from = ""

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic_tissue"  # TFDS name, optionally "name/builder_config"
  c.dataset.data_dir = ""  # "" -> TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.dataset.manual_dir = ""  # archives the user downloaded, for datasets that need them
  c.dataset.prepare_if_missing = True
  c.dataset.train_split = "train"
  c.dataset.gallery_split = "train"
  c.dataset.query_split = "test"

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 64  # global, over all devices and processes
  c.input.sampler = "m_per_class"  # or "shuffle"
  c.input.m_per_class = 8
  c.input.image_size = 224
  c.input.crop = "random"  # random | random_resized (area and aspect jitter, then resize)
  c.input.crop_scale_min = 0.08  # random_resized: fraction of the patch area kept
  c.input.crop_scale_max = 1.0
  c.input.crop_ratio_min = 3 / 4  # random_resized: aspect ratio range
  c.input.crop_ratio_max = 4 / 3
  c.input.flip_rot90 = True  # histology has no canonical orientation
  c.input.num_workers = 0  # Grain worker processes; 0 reads in the main process
  c.input.prefetch = 2
  # Decode the training split once into a private memory-mapped file when it fits in this
  # many GiB (0: decode every read). On a 16-core GPU host decoding PNG tiles on every read
  # delivered 0.69x of what a ResNet-50 step consumes (histojax/data/decoded.py).
  c.input.decoded_cache_gb = 8.0
  c.input.eval_batch_size = 256

  # Device-side colour per view (view2 is used by two-view objectives only).
  c.augment = ml_collections.ConfigDict(dict(view1=colour.view_defaults(), view2=colour.view_defaults()))

  c.model = models.model_config(model, head)
  c.objective = objectives.OBJECTIVES.defaults(objective)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | sgd | lars
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_fraction = 0.0  # cosine decays to lr * this
  c.optimizer.weight_decay = 1e-4  # on kernels only, not on biases or norm scales
  c.optimizer.momentum = 0.9  # sgd and lars
  c.optimizer.grad_clip_norm = 0.0  # 0 disables clipping

  # Fine-tuning a pretrained trunk (histojax/optim.py): which of it trains, and how fast by depth.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.trunk = "train"  # train | frozen (head only) | last_blocks (the last `unfrozen_blocks` + head)
  c.finetune.unfrozen_blocks = 0  # last_blocks: how many of the trunk's blocks (ResNet: stages) train
  c.finetune.layer_decay = 1.0  # block i of L learns at lr * layer_decay ** (L + 1 - i); 1: no decay

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1 takes the devices fsdp leaves
  c.mesh.fsdp = 1  # devices that split params + optimizer state (FSDP); 1 replicates; -1 takes all
  # (regex on the state path, "fsdp" | "replicate"), first match wins; see histojax/sharding.py.
  c.mesh.rules = ((".*", "fsdp"),)
  c.mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated (not worth a gather)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True
  # While training: every this many steps a cheap retrieval score (histojax/evaluators.py) goes to
  # TensorBoard and train_metrics.jsonl as during/precision@k, during/map@k, during/majority_vote@k.
  # 0: off. Never at step 0, nor at the last step when `at_end` scores the same query split there.
  c.eval.every_steps = 0
  c.eval.during = ml_collections.ConfigDict()
  c.eval.during.gallery_rows = 2048  # rows of dataset.gallery_split, drawn once from config.seed
  c.eval.during.query_rows = 256  # rows of the query split below, drawn likewise
  c.eval.during.query_split = ""  # "" -> dataset.query_split; held-out runs name "validation"
  c.eval.ks = (1, 5, 10)
  c.eval.exclude_same_source = True  # a query is never answered by its own source image
  c.eval.tta = "none"  # none | d8: embed the mean over the 8 flips/rotations (gallery and queries alike)
  # Every ScaNN/ADC knob, with its default and why, is a field of histojax.indexing.IndexConfig.
  c.eval.index = ml_collections.ConfigDict(dataclasses.asdict(indexing.IndexConfig()))

  c.lock()
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that a type lock cannot; errors name the field."""
  inp = config.input
  if inp.batch_size <= 0:
    raise ValueError(f"input.batch_size must be positive, got {inp.batch_size}")
  if inp.sampler not in ("m_per_class", "shuffle"):
    raise ValueError(f"input.sampler must be 'm_per_class' or 'shuffle', got {inp.sampler!r}")
  if inp.crop not in ("random", "random_resized"):
    raise ValueError(f"input.crop must be 'random' or 'random_resized', got {inp.crop!r}")
  if not 0 < inp.crop_scale_min <= inp.crop_scale_max <= 1:
    raise ValueError(f"input.crop_scale_min/max must satisfy 0 < min <= max <= 1, got "
                     f"{inp.crop_scale_min}, {inp.crop_scale_max}")
  if inp.sampler == "m_per_class" and inp.batch_size % inp.m_per_class:
    raise ValueError(
        f"input.batch_size ({inp.batch_size}) must be a multiple of input.m_per_class ({inp.m_per_class})")
  if config.total_steps < 0:
    raise ValueError(f"total_steps must be positive (or 0 with init_from, to evaluate imported weights), "
                     f"got {config.total_steps}")
  if config.total_steps == 0 and not config.init_from:
    raise ValueError("total_steps must be positive (or 0 with init_from, to evaluate imported weights): "
                     "total_steps=0 evaluates imported weights, so give them with --config.init_from=DIR "
                     "(a folder written by python -m histojax.convert)")
  if config.optimizer.name not in optim.NAMES:
    raise ValueError(f"optimizer.name must be one of {optim.NAMES}, got {config.optimizer.name!r}")
  _validate_finetune(config.finetune)
  models.MODELS.get(config.model.name)
  objectives.OBJECTIVES.get(config.objective.name)
  # index knobs fail here, before training, not at eval
  indexing.IndexConfig.from_config(config.eval.index)
  if config.eval.tta not in ("none", "d8"):  # step.TTA_MODES; step imports config, not the other way round
    raise ValueError(f"eval.tta must be 'none' or 'd8', got {config.eval.tta!r}")
  sharding.compile_rules(config.mesh)
  _validate_during(config.eval)


def _validate_during(eval_config: ml_collections.ConfigDict) -> None:
  if not isinstance(eval_config.every_steps, int) or eval_config.every_steps < 0:
    raise ValueError(f"eval.every_steps must be 0 (off) or a positive number of steps, got {eval_config.every_steps!r}")
  for field in ("gallery_rows", "query_rows"):
    if eval_config.during[field] < 1:
      raise ValueError(f"eval.during.{field} must be at least 1, got {eval_config.during[field]}")


def _validate_finetune(ft: ml_collections.ConfigDict) -> None:
  if ft.trunk not in optim.TRUNKS:
    raise ValueError(f"finetune.trunk must be one of {optim.TRUNKS}, got {ft.trunk!r}")
  if (ft.trunk == "last_blocks") != (ft.unfrozen_blocks > 0) or ft.unfrozen_blocks < 0:
    raise ValueError(f"finetune.unfrozen_blocks must be positive with trunk='last_blocks' and 0 otherwise, "
                     f"got {ft.unfrozen_blocks} with trunk={ft.trunk!r}")
  if not 0 < ft.layer_decay <= 1:
    raise ValueError(f"finetune.layer_decay must be in (0, 1], got {ft.layer_decay}")


def adopt_converted_architecture(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Takes over the architecture fields that `config.init_from`'s weights decide, when the
  folder holds a converted preset (`convert --preset`) and the config names that preset.

  A preset's defaults are its published full-depth architecture; the folder's manifest records
  what its config.json and tensors said (`inferred`: widths, depth, position grid), which is what
  the weights fit. Returns {field: (config's value, the weights')} for the fields it changed.
  Nothing is read when init_from is empty or gone (a resumed run restores its checkpoint), or
  for folders of the other formats, whose model the config chooses. A trunk frozen in whole or
  part (`finetune.trunk`) without init_from is refused: it would keep its random init.
  """
  if not config.init_from and config.finetune.trunk != "train":
    raise ValueError(f"finetune.trunk={config.finetune.trunk!r} keeps the trunk's weights: give them with "
                     "--config.init_from=DIR (a folder written by python -m histojax.convert)")
  if not config.init_from or not (epath.Path(config.init_from) / "manifest.json").exists():
    return {}
  manifest = weights_store.read_manifest(config.init_from)
  preset = manifest.get("preset")
  if not preset:
    return {}
  if config.model.name != preset:
    raise ValueError(f"init_from={config.init_from!r} holds {preset!r} weights (convert --preset {preset}), "
                     f"but model.name is {config.model.name!r}: build the config for {preset!r}")
  changed = {}
  for field, value in (manifest.get("inferred") or {}).items():
    if field in config.model and config.model[field] != value:
      changed[field] = (config.model[field], value)
      config.model[field] = type(config.model[field])(value)
  return changed


def parse_variants(arg: str | None, known: dict[str, tuple]) -> dict[str, str | bool]:
  """`--config file.py:cpu,loss=abe` -> {"cpu": True, "loss": "abe"}.

  `known` maps each variant name to its allowed values (() for a plain flag);
  anything else is refused, naming the known variants.
  """
  chosen = {}
  for token in filter(None, (arg or "").split(",")):
    name, _, value = token.partition("=")
    if name not in known or (value and value not in known[name]) or (not value and known[name]):
      options = ", ".join(f"{k}={'|'.join(v)}" if v else k for k, v in known.items())
      raise ValueError(f"unknown config variant {token!r}; known: {options}")
    chosen[name] = value or True
  return chosen


CLASS_COUNT_FIELDS = ("num_classes", "probe_classes")  # in model.head; -1 means "the dataset's"


def resolve_class_counts(config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Fills every model.head class count left at -1 with the dataset's number of classes."""
  head = config.model.get("head")
  for field in CLASS_COUNT_FIELDS:
    if head is not None and field in head and head[field] == -1:
      head[field] = num_classes


def save(config: ml_collections.ConfigDict, path: epath.PathLike) -> None:
  epath.Path(path).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load(path: epath.PathLike) -> ml_collections.ConfigDict:
  """Reads a config written by `save` and relocks it against the schema.

  A damaged or foreign file raises CorruptFileError naming it and the field.
  """
  raw = untrusted.read_json(path, "run config (config.json)")
  try:
    head = (raw["model"].get("head") or {}).get("name")
    for field, value in models.LEGACY_HEAD_FIELDS.get(head, {}).items():
      raw["model"]["head"].setdefault(field, value)  # written before the field: the value it was built with
    config = base_config(raw["model"]["name"], raw["objective"]["name"], head)
    config.update_from_flattened_dict(_flatten(raw))
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise untrusted.CorruptFileError(f"{path} is not a histojax run config: {type(e).__name__}: {e}") from None
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = _tuples(value)
  return flat


def _tuples(value):
  """JSON lists back to the tuples they were (nested, e.g. mesh.rules)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
