"""Embed images with converted weights: one feature row per image, or per tile.

    python -m histojax.embed --weights OUT --images FILE_OR_DIR [...] --out features.npy \\
        [--json] [--dtype bfloat16] [--tiling INDEX_OR_DATASET] [--batch N]

`--weights` is a folder written by `python -m histojax.convert` (what `init_from`
takes); its manifest names the model, and for a foundation-model preset
(`convert --preset`) the feature convention and the model card's input transform.
Without `--tiling` every image gives one row: resized and centre-cropped to the
preset's input as its card does (`CardTransform`). With `--tiling INDEX` images are
cut as that index's manifest cut its gallery, with `--tiling DATASET` (e.g.
`bach/default`) as that dataset's builder cut its `--split`: one row per tile kept.

Features are float32 in the model's published convention (class token, class token
+ patch mean, pooler), not L2-normalised; `--dtype bfloat16` computes in bf16 and
still writes float32. They are computed by `Encoder`, the same forward pass the
parity tests hold against timm / transformers, batched over every local device.
`--json` writes `<out>.json` beside the array (a row's source image and, for tiles,
coordinates in the resized image) and prints the summary as one JSON object.
The spread of the rows (`health.spread`) is printed and recorded; a collapsed set
(norm of the mean unit row above 0.9) is warned about.

Bad input (no weights folder, an unreadable image, an image smaller than the
input) stops the run with the file named before anything is written; both files
are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

# datasets: importing it registers the builders, for --tiling DATASET
from histojax import datasets, export, fileio, health, indexing, models, monitor, query, search  # noqa: F401
from histojax import mesh as mesh_lib
from histojax.data import augment, images
from histojax.models import heads, presets
from histojax.weights import store

DTYPES = tuple(models.DTYPES)


# --- The model -------------------------------------------------------------------------

def read_weights_manifest(directory: str) -> dict:
  """The convert output's manifest; errors name `--weights` and what the folder lacks."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"--weights {directory}: no such folder (a folder written by python -m histojax.convert)")
  if not os.path.isfile(os.path.join(directory, "manifest.json")):
    raise FileNotFoundError(f"--weights {directory} holds no manifest.json: it must be a folder written by "
                            "python -m histojax.convert")
  return store.read_manifest(directory)


def model_config(manifest: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The converted model's config: its recorded fields, the backbone's own features (no
  projection head) and the compute dtype."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  cfg = models.model_config(manifest["model"]["name"])
  cfg.update(manifest["model"])
  if "embed_dim" in cfg and cfg.get("head", {}).get("name") == "linear":
    cfg.embed_dim = 0
  cfg.dtype = dtype
  return cfg


def _features(graphdef, state, images_):
  model = nnx.merge(graphdef, state)
  model.eval()
  return heads.global_pool(model.features(images_)).astype(jnp.float32)


def _filled(state: nnx.State, directory: str) -> nnx.State:
  """Head variables the folder does not hold (unused by the features) as zeros; any other
  variable left unloaded is refused: features from a fresh init are not the published model's."""
  flat = nnx.to_flat_state(state)
  fresh = [".".join(map(str, path)) for path, var in flat if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
  trunk = [name for name in fresh if not name.startswith("head.")]
  if trunk:
    raise ValueError(f"--weights {directory} leaves {len(trunk)} backbone variables at their fresh init "
                     f"(e.g. {trunk[0]}); their features are not the published model's")
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, state)


class Encoder:
  """A convert output as a feature extractor: uint8 [n, s, s, 3] in, float32 [n, d] out,
  replicated on every local device, each batch split over them (`mesh.map_padded`)."""

  def __init__(self, directory: str, dtype: str = "float32", batch: int = 64):
    if batch <= 0:
      raise ValueError(f"--batch must be positive, got {batch}")
    self.directory, self.batch = directory, batch
    self.manifest = read_weights_manifest(directory)
    self.config = model_config(self.manifest, dtype)
    self.mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    graphdef, abstract = nnx.split(models.abstract_model(self.config))
    state = _filled(store.apply(abstract, directory), directory)
    self.state = jax.device_put(state, mesh_lib.replicated(self.mesh))
    self._features = jax.jit(lambda s, x: _features(graphdef, s, x),
                             out_shardings=mesh_lib.batch_sharding(self.mesh))
    side = 2 * self.config.get("patch", 16)  # a ViT takes whole patches only
    probe = jax.ShapeDtypeStruct((self.mesh.size, side, side, 3), np.uint8)
    self.dim = int(jax.eval_shape(self._features, self.state, probe).shape[1])

  @property
  def cap(self) -> int:
    """Rows per device call: `batch` rounded down to whole devices (at least one each)."""
    return max(self.mesh.size, self.batch // self.mesh.size * self.mesh.size)

  def __call__(self, patches: np.ndarray) -> np.ndarray:
    out = mesh_lib.map_padded(lambda batch: self._features(self.state, batch), np.asarray(patches, np.uint8),
                              self.mesh, self.batch)
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


# --- Inputs: the card's transform, or the gallery's tiling --------------------------------

@dataclasses.dataclass(frozen=True)
class CardTransform:
  """A model card's eval transform on one image (presets.Preset: size, resize, interpolation, crop)."""
  size: int
  resize: int
  interpolation: str = "bilinear"
  crop: str = "center"

  def __call__(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) < self.size:
      raise ValueError(f"image of {w}x{h} px is smaller than the model input {self.size}x{self.size}")
    if self.crop == "squash":
      return augment.resize_square(image, self.size, self.interpolation)
    resized = augment.resize_short_side(image, self.resize, self.interpolation)
    return augment.center_crop_rounded(resized, self.size)

  def describe(self) -> str:
    if self.crop == "squash":
      return f"resize to {self.size}x{self.size} ({self.interpolation})"
    return f"short side to {self.resize} ({self.interpolation}), centre crop {self.size}"


def card_transform(manifest: dict) -> CardTransform:
  """The preset's transform as the manifest recorded it (fields a folder converted before they
  were recorded come from the preset). A folder of another format gets its model's input size,
  short side resized bicubic and centre-cropped: timm's default, not a card's."""
  if "preset" in manifest:
    spec = presets.get(manifest["preset"])
    recorded = {"size": spec.input_size, "resize": spec.resize, "interpolation": spec.interpolation,
                "crop": spec.crop, **manifest.get("input", {})}
    return CardTransform(int(recorded["size"]), int(recorded["resize"]), recorded["interpolation"], recorded["crop"])
  size = int(manifest["model"].get("image_size", 224))
  return CardTransform(size, size, "bicubic", "center")


def index_tiling(directory: str) -> tuple[dict, int, dict]:
  """(tiling record, model input size, where from) of an index folder's gallery."""
  manifest = indexing.read_manifest(directory)
  size = int(manifest["image_size"])
  return query.tiling_record(manifest, size), size, {"index": os.path.abspath(directory)}


def dataset_tiling(name: str, image_size: int, data_dir: str = "", split: str = "train") -> tuple[dict, int, dict]:
  """(tiling record, model input size, where from) of a dataset's `split`, as its builder cut it."""
  try:
    found = export.dataset_tiling(name, data_dir, split)
  except ValueError as e:
    raise ValueError(f"--tiling {name!r} is neither an index folder nor a known dataset: {e}") from None
  if found is None:
    raise ValueError(f"--tiling {name!r}: the dataset's builder does not say how it cuts its images")
  try:
    rec = query.tiling_record({"tiling": found}, image_size)
  except ValueError as e:
    raise ValueError(f"--tiling {name!r}: {e}; pass --image_size (e.g. {found['patch_size']}) to run the model "
                     f"at the tile size") from None
  return rec, image_size, {"dataset": name, "split": split}


def tiling_from(spec: str, default_size: int, image_size: int = 0, data_dir: str = "",
                split: str = "train") -> tuple[dict, int, dict]:
  """`--tiling`: an index folder (its gallery's cutting and model input), else a dataset name
  (its builder's cutting at `image_size`, default the model's input)."""
  if os.path.isdir(spec):
    if image_size:
      raise ValueError("--image_size applies to --tiling DATASET; an index cuts at its own model input")
    return index_tiling(spec)
  return dataset_tiling(spec, image_size or default_size, data_dir, split)


# --- The run ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Embedded:
  features: np.ndarray  # [rows, d] float32
  rows: list  # per row: source, and y, x, tissue_fraction for tiles
  images: list  # per image: source, width, height, rows, tiles_dropped


def check_sizes(paths: list[str], transform: CardTransform | None) -> None:
  """Every file's header readable (nothing decoded) and, without tiling, no side under the input:
  a bad file stops the run before any compute."""
  for path in paths:
    header = images.probe(path)
    if transform is not None and min(header.width, header.height) < transform.size:
      raise ValueError(f"{path}: image of {header.width}x{header.height} px is smaller than the model input "
                       f"{transform.size}x{transform.size}")


def _rows_of(path: str, image: np.ndarray, transform: CardTransform | None, tiling: dict | None, size: int):
  """(uint8 inputs, row records, image record) of one decoded image."""
  h, w = image.shape[:2]
  try:
    if tiling is None:
      return transform(image)[None], [{"source": path, "width": w, "height": h}], \
          {"source": path, "width": w, "height": h, "rows": 1, "tiles_dropped": 0}
    patches = query.cut(image, tiling, size)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  rows = [{"source": path, "y": int(y), "x": int(x), "tissue_fraction": None if t is None else round(float(t), 4)}
          for (y, x), t in zip(patches.coords, patches.tissue)]
  return patches.images, rows, {"source": path, "width": w, "height": h, "rows": len(rows),
                                "tiles_dropped": int(patches.dropped)}


def embed_paths(encoder: Encoder, paths: list[str], transform: CardTransform | None = None,
                tiling: dict | None = None, size: int = 0,
                max_pixels: int = images.DEFAULT_MAX_PIXELS["search"]) -> Embedded:
  """Every image's rows, in order, embedded in full device batches as they accumulate."""
  check_sizes(paths, transform)
  pending, parts, rows, per_image = [], [], [], []
  for path in paths:
    inputs, image_rows, record = _rows_of(path, images.read_image(path, max_pixels=max_pixels), transform,
                                          tiling, size)
    pending.append(inputs)
    rows += image_rows
    per_image.append(record)
    if sum(len(p) for p in pending) >= encoder.cap:
      stacked = np.concatenate(pending)
      whole = len(stacked) // encoder.cap * encoder.cap
      parts.append(encoder(stacked[:whole]))
      pending = [stacked[whole:]]
  if pending:
    parts.append(encoder(np.concatenate(pending)))
  features = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
  assert len(features) == len(rows), (len(features), len(rows))
  return Embedded(features, rows, per_image)


def sidecar_path(out: str) -> str:
  """`features.npy` -> `features.json`."""
  return out[:-len(".npy")] + ".json"


def write(out: str, embedded: Embedded, record: dict, with_rows: bool) -> None:
  """The array (and, `with_rows`, the JSON sidecar) written atomically: each is either whole or absent."""
  with fileio.atomic_open(out) as f:
    np.save(f, embedded.features)
    if with_rows:  # renamed into place before the array is, and never if the array failed
      fileio.write_json(sidecar_path(out), {**record, "rows": embedded.rows, "images": embedded.images})


def run(weights: str, paths: list[str], out: str, *, dtype: str = "float32", batch: int = 64, tiling: str = "",
        image_size: int = 0, data_dir: str = "", split: str = "train", with_rows: bool = False,
        max_pixels: int = images.DEFAULT_MAX_PIXELS["search"]) -> dict:
  """Embeds `paths` (files and folders, as `--images`) into `out`; returns the summary record."""
  if not out.endswith(".npy"):
    raise ValueError(f"--out must name a .npy file, got {out!r}")
  if image_size and not tiling:
    raise ValueError("--image_size applies to --tiling DATASET; without tiling the card's input is used")
  files = images.image_paths(paths, "--images")
  manifest = read_weights_manifest(weights)
  transform = card_transform(manifest)
  patch = manifest["model"].get("patch")
  if image_size and patch and image_size % patch:
    raise ValueError(f"--image_size {image_size} is not a multiple of the model's patch ({patch} px)")
  rec, size, source = (None, transform.size, None) if not tiling else \
      tiling_from(tiling, transform.size, image_size, data_dir, split)
  encoder = Encoder(weights, dtype, batch)
  embedded = embed_paths(encoder, files, None if rec else transform, rec, size, max_pixels)
  spread = health.spread(embedded.features) if len(embedded.features) else None
  record = {"kind": "histojax.embed", "weights": os.path.abspath(weights), "model": manifest["model"]["name"],
            "preset": manifest.get("preset"), "feature": encoder.config.get("pool"), "dim": encoder.dim,
            "dtype": dtype, "count": len(embedded.features), "image_count": len(files), "image_size": size,
            "input": dataclasses.asdict(transform) if rec is None else None, "tiling": rec, "tiling_from": source,
            "gallery_mpp": manifest.get("gallery_mpp"), "spread": spread, "out": os.path.abspath(out)}
  write(out, embedded, record, with_rows)
  if spread is not None and spread["rows"] > 1 and spread["collapsed"]:
    warnings.warn(f"{out}: collapsed features: the norm of the mean unit row is {spread['mean_norm']:.4f} "
                  f"(> {health.COLLAPSE_ABOVE}; mean pairwise cosine {spread['mean_norm'] ** 2:.4f}). Either "
                  "the images look alike to this model, or the weights, preset or input do not fit it "
                  "(compare a few rows of clearly different tissue).", health.CollapsedEmbeddingWarning,
                  stacklevel=2)
  return record


def summary(record: dict) -> str:
  how = (CardTransform(**record["input"]).describe() if record["input"] else
         f"cut as {record['tiling_from']} cut its gallery, at {record['image_size']} px")
  lines = [f"{record['count']} rows from {record['image_count']} images ({how}) -> {record['out']}",
           f"features: {record['dim']} float32 per row, {record['preset'] or record['model']} "
           f"{record['feature'] or ''} computed in {record['dtype']}"]
  spread = record["spread"]
  if spread is None or spread["rows"] < 2:
    lines.append("spread: fewer than 2 rows, not measured")
  else:
    dim = spread["effective_dim"]
    lines.append(f"spread: norm of the mean unit row {spread['mean_norm']:.4f}"
                 + ("" if dim is None else f", effective dimension {dim:.1f} of {spread['dim']}")
                 + (f" (COLLAPSED: above {health.COLLAPSE_ABOVE})" if spread["collapsed"] else ""))
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("weights", None, "Folder written by python -m histojax.convert.", required=True)
  flags.DEFINE_multi_string("images", [], "Image file or folder (repeatable; further paths may follow the flags).")
  flags.DEFINE_string("out", None, "The .npy file to write ([rows, d] float32).", required=True)
  flags.DEFINE_bool("json", False, "Write <out>.json (each row's source image and tile coordinates) and print "
                    "the summary as one JSON object.")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype (the features are written as float32).")
  flags.DEFINE_string("tiling", "", "Cut images as this index folder, or this dataset (e.g. bach/default), "
                      "cut its gallery: one row per tile. Default: one row per image, the card's transform.")
  flags.DEFINE_integer("batch", 64, "Images per device call (over all local devices).", lower_bound=1)
  flags.DEFINE_integer("image_size", 0, "With --tiling DATASET: the model input the tiles are centre-cropped "
                       "to; default the preset's.", lower_bound=0)
  flags.DEFINE_string("data_dir", "", "With --tiling DATASET: its TFDS data_dir, for a dataset built elsewhere.")
  flags.DEFINE_string("split", "train", "With --tiling DATASET: the split whose cutting is followed.")
  flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS["search"], "Refuse images with more pixels "
                       "than this, read from the header before decoding.", lower_bound=1)


def main(argv: list[str]) -> int:
  FLAGS = flags.FLAGS
  paths = list(FLAGS.images) + list(argv[1:])
  if not paths:
    raise app.UsageError("give images: --images FILE_OR_DIR [more paths]")
  monitor.quiet_libraries()
  with search.stdout_reserved() as answers:
    try:
      record = run(FLAGS.weights, paths, FLAGS.out, dtype=FLAGS.dtype, batch=FLAGS.batch, tiling=FLAGS.tiling,
                   image_size=FLAGS.image_size, data_dir=FLAGS.data_dir, split=FLAGS.split,
                   with_rows=FLAGS.json, max_pixels=FLAGS.max_pixels)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:  # ImageError is a ValueError
      print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
      return 1
    print(json.dumps(record) if FLAGS.json else summary(record), file=answers)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
