"""Answer image queries with the nearest gallery patches of a saved index.

    python -m histojax.search --index DIR/index --images a.png slides/ --k 10 [--json]

The query model is the checkpoint the index was built from (named in its
manifest), or `--workdir`/`--step` to name another; it is refused, with the
fields that differ, unless its step, weights, architecture, input size and
normalisation match the manifest. An image larger than the model input is cut
the way the dataset's builder cut the gallery (`tiling.tile_image` with the
manifest's tiling: patch size, stride, resize, tissue filter); each tile is
centre-cropped to the model input as export does, searched, and the image
gets a majority vote pooled over its tiles' top k.

`--json` prints one JSON object per query image on stdout and nothing else
there (every library's output is sent to stderr); a query that fails (an
unreadable file, an image smaller than the model input) gets an object with
an "error" field and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import numpy as np
from etils import epath

from histojax import index, metrics
from histojax.data import augment, images, tiling

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --- Inputs ----------------------------------------------------------------------

def query_paths(items: list[str]) -> list[str]:
  """Files as given, and the image files under each folder (recursively, sorted).

  Fails before anything is searched if a path does not exist or a folder holds no image.
  """
  paths = []
  for item in items:
    if os.path.isdir(item):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                     if name.lower().endswith(IMAGE_SUFFIXES))
      if not found:
        raise FileNotFoundError(f"--images: folder {item} holds no image ({', '.join(IMAGE_SUFFIXES)})")
      paths.extend(found)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f"--images: {item} does not exist")
  return paths


def read_image(path: str, max_pixels: int = images.DEFAULT_MAX_PIXELS["search"]) -> np.ndarray:
  """uint8 HxWx3; a file that cannot be decoded, or declares more than `max_pixels`
  pixels, raises `images.ImageError` (a ValueError) naming it, before decoding."""
  return images.read_image(path, max_pixels=max_pixels)


def tiling_config(manifest: dict, image_size: int, resize: float | None = None):
  """The gallery's tiling from the manifest; without one, tiles of the model input size."""
  fields = dict(manifest.get("tiling") or dict(patch_size=image_size, stride=image_size, min_tissue_fraction=0.0))
  if resize is not None:
    fields["resize"] = resize
  cfg = tiling.TilingConfig(**fields)
  if cfg.patch_size < image_size:
    raise ValueError(f"tiling patch_size {cfg.patch_size} is smaller than the model input {image_size}")
  return cfg


@dataclasses.dataclass
class Patches:
  images: np.ndarray  # [n, s, s, 3] uint8, model input size
  coords: list  # (y, x) of each tile in the (resized) image
  tissue: list  # tissue fraction of each tile; None for an image taken whole (not filtered)
  dropped: int  # tiles dropped as background


def cut(image: np.ndarray, cfg, image_size: int) -> Patches:
  """Tiles like the builder (when the image exceeds one patch), each centre-cropped to the model input.

  An image no larger than one patch (after resizing) is one patch, as the
  builder stores such tiles; smaller than the model input is an error.
  """
  resized = tiling.resize(image, cfg.resize)
  h, w = resized.shape[:2]
  if h < image_size or w < image_size:
    raise ValueError(f"image of {w}x{h} px (after resize {cfg.resize}) is smaller than the model input "
                     f"{image_size}x{image_size}")
  if min(h, w) < cfg.patch_size or max(h, w) <= cfg.patch_size:  # not even one whole tile more
    return Patches(augment.center_crop(resized, image_size)[None], [(0, 0)], [None], 0)  # not filtered
  tiles, dropped = tiling.tile_image(image, cfg)
  images = np.stack([augment.center_crop(t.image, image_size) for t in tiles]) if tiles else \
      np.zeros((0, image_size, image_size, 3), np.uint8)
  return Patches(images, [(t.y, t.x) for t in tiles], [t.tissue_fraction for t in tiles], dropped)


# --- The query model -------------------------------------------------------------------

class QueryModel:
  """A restored checkpoint that embeds uint8 patches, checked against an index manifest."""

  def __init__(self, workdir: epath.PathLike, step: int | None = None):
    # JAX, Orbax and the model load only here, once the arguments were found valid.
    import jax  # noqa: PLC0415

    from histojax import config as config_lib  # noqa: PLC0415
    from histojax import evaluate, export  # noqa: PLC0415
    from histojax import step as step_lib  # noqa: PLC0415

    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
      raise FileNotFoundError(f"query model workdir {workdir} has no config.json")
    self.config = config_lib.load(workdir / "config.json")
    self.config.mesh.data = -1  # whatever devices this machine has
    self.trainer, self.state, self.step = evaluate.restore_for_eval(self.config, workdir, step)
    self.fingerprint = export.fingerprint(self.trainer, self.state)
    self.image_size = self.config.input.image_size
    self._embed = step_lib.jit_embed(self.trainer)
    self._devices = self.trainer.mesh.size
    probe = jax.ShapeDtypeStruct((self._devices, self.image_size, self.image_size, 3), np.uint8)
    self.dim = int(jax.eval_shape(self._embed, self.state, probe).shape[1])
    self.identity = json.loads(json.dumps({
        "step": self.step, "fingerprint": self.fingerprint, "model": self.config.model.to_dict(),
        "image_size": self.image_size, "normalization": export.NORMALIZATION, "dim": self.dim}))

  def check(self, manifest: dict, index_dir) -> None:
    index.check_manifest(manifest, self.identity, index_dir)

  def embed(self, patches: np.ndarray) -> np.ndarray:
    """[n, s, s, 3] uint8 -> [n, d] float32, in padded batches of a few sizes (few compilations)."""
    from histojax import mesh as mesh_lib  # noqa: PLC0415

    cap = max(self._devices, self.config.input.eval_batch_size // self._devices * self._devices)
    out = []
    for start in range(0, len(patches), cap):
      chunk = patches[start:start + cap]
      size = min(cap, self._devices * 2 ** int(np.ceil(np.log2(max(1, -(-len(chunk) // self._devices))))))
      padded = np.zeros((size, *chunk.shape[1:]), np.uint8)
      padded[:len(chunk)] = chunk
      batch = mesh_lib.to_global({"image": padded}, self.trainer.mesh)["image"]
      out.append(np.asarray(mesh_lib.to_host(self._embed(self.state, batch)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


# --- Answers ------------------------------------------------------------------------------

def answer(path: str, patches: Patches, neighbors: np.ndarray, scores: np.ndarray, rows: dict,
           class_names: list[str], tiling_cfg, shape) -> dict:
  """The JSON-ready answer for one query image."""
  name = lambda label: class_names[label] if 0 <= label < len(class_names) else str(label)
  tiles = []
  for (y, x), tissue, found, score in zip(patches.coords, patches.tissue, neighbors, scores):
    results = [{"rank": r + 1, "gallery_row": int(n), "label": name(int(rows["label"][n])),
                "label_id": int(rows["label"][n]), "source_id": str(rows["source_id"][n]),
                "coords": [int(c) for c in rows["coords"][n]], "score": round(float(s), 6)}
               for r, (n, s) in enumerate(zip(found, score)) if n >= 0]
    tiles.append({"y": int(y), "x": int(x), "results": results,
                  "tissue_fraction": None if tissue is None else round(float(tissue), 4)})
  vote = None
  if len(neighbors):
    retrieved = metrics.neighbor_labels(neighbors, rows["label"])
    _, winner, counts = metrics.pooled_vote(retrieved, np.zeros(len(retrieved), np.int64), neighbors.shape[1])
    if winner[0] >= 0:
      votes = {name(c): int(v) for c, v in enumerate(counts[0]) if v}
      vote = {"label": name(int(winner[0])), "label_id": int(winner[0]),
              "fraction": round(int(counts[0, winner[0]]) / int(counts[0].sum()), 4), "votes": votes}
  return {"query": path, "height": int(shape[0]), "width": int(shape[1]), "tiling": dataclasses.asdict(tiling_cfg),
          "tiles_searched": len(tiles), "tiles_dropped": int(patches.dropped), "vote": vote, "tiles": tiles}


def format_answer(result: dict) -> str:
  """Human-readable lines for one answer."""
  if "error" in result:
    return f"{result['query']}: error: {result['error']}"
  vote = result["vote"]
  head = (f"{result['query']} ({result['width']}x{result['height']}): {result['tiles_searched']} tile(s) searched, "
          f"{result['tiles_dropped']} dropped as background; "
          + (f"image vote: {vote['label']} ({vote['fraction']:.0%} of {sum(vote['votes'].values())} votes)"
             if vote else "no tissue tile, no vote"))
  lines = [head, f"  {'tile (y, x)':<14}{'rank':>5}{'score':>9}  {'label':<16}{'source image':<22}coords"]
  for tile in result["tiles"]:
    for r in tile["results"]:
      lines.append(f"  {str((tile['y'], tile['x'])):<14}{r['rank']:>5}{r['score']:>9.4f}  {r['label']:<16}"
                   f"{r['source_id']:<22}{tuple(r['coords'])}")
  return "\n".join(lines)


def model_workdir(args, manifest: dict) -> str:
  """--workdir, else the workdir the manifest names, else the index's parent folder
  (a workdir copied elsewhere whole still finds its checkpoints)."""
  if args.workdir:
    return args.workdir
  recorded = manifest["checkpoint"]["workdir"]
  parent = os.path.dirname(os.path.abspath(args.index.rstrip("/")))
  for candidate in (recorded, parent):
    if os.path.exists(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"the index's model workdir {recorded} is gone (no config.json there nor in {parent}); "
                          "pass --workdir")


def run(args, emit) -> int:
  """Searches every query image; `emit(result)` prints one answer. Returns the exit status."""
  manifest = index.read_manifest(args.index)
  paths = query_paths(args.images)
  model = QueryModel(model_workdir(args, manifest), args.step if args.step is not None else manifest["checkpoint"]["step"])
  model.check(manifest, args.index)
  idx, _ = index.load(args.index)
  rows = index.load_rows(args.index)
  cfg = tiling_config(manifest, model.image_size, args.resize)
  class_names = manifest.get("class_names") or []
  status = 0
  for path in paths:
    try:
      image = read_image(path, args.max_pixels)
      patches = cut(image, cfg, model.image_size)
    except ValueError as e:
      emit({"query": path, "error": str(e)})
      status = 1
      continue
    if len(patches.images):
      neighbors, scores = index.search(idx, model.embed(patches.images), args.k)
    else:
      neighbors, scores = np.zeros((0, args.k), np.int64), np.zeros((0, args.k), np.float32)
    emit(answer(path, patches, neighbors, scores, rows, class_names, cfg, image.shape))
  return status


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m histojax.search", description=__doc__.split("\n\n")[0])
  parser.add_argument("--index", required=True, help="index folder written by evaluate (<workdir>/index)")
  parser.add_argument("--images", required=True, nargs="+", metavar="FILE_OR_DIR", help="query images or folders")
  parser.add_argument("--k", type=int, default=10, help="gallery patches per query tile")
  parser.add_argument("--json", action="store_true", help="one JSON object per query on stdout, nothing else")
  parser.add_argument("--workdir", help="query model workdir; default the one named in the index manifest")
  parser.add_argument("--step", type=int, help="query model checkpoint step; default the manifest's")
  parser.add_argument("--resize", type=float, help="replace the gallery's resize factor, for query images "
                      "scanned at another magnification (e.g. 0.5 for 40x queries against a 20x gallery)")
  parser.add_argument("--max_pixels", type=int, default=images.DEFAULT_MAX_PIXELS["search"],
                      help="refuse query images with more pixels than this, read from the header before "
                      "decoding (default %(default)s: any histology RoI; a decompression bomb is refused)")
  args = parser.parse_args(argv)
  if args.max_pixels <= 0:
    parser.error(f"--max_pixels must be positive, got {args.max_pixels}")
  if args.k <= 0:
    parser.error(f"--k must be positive, got {args.k}")
  return args


@contextlib.contextmanager
def stdout_reserved():
  """Sends everything written to fd 1 (Python or C++ libraries) to stderr, and yields
  a file on the real stdout for the answers alone."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  answers = os.fdopen(saved, "w", buffering=1)
  real_stdout, sys.stdout = sys.stdout, sys.stderr
  try:
    yield answers
  finally:
    sys.stdout = real_stdout
    answers.flush()
    os.dup2(saved, 1)
    answers.close()


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  from absl import flags, logging  # noqa: PLC0415
  flags.FLAGS.mark_as_parsed()  # absl-using libraries expect parsed flags; ours are argparse's
  logging.set_verbosity(logging.WARNING)
  with stdout_reserved() as answers:
    emit = ((lambda r: print(json.dumps(r), file=answers)) if args.json
            else (lambda r: print(format_answer(r), file=answers)))
    try:
      return run(args, emit)
    except (FileNotFoundError, ValueError) as e:  # ManifestMismatch is a ValueError
      print(f"error: {e}", file=sys.stderr)
      return 2


if __name__ == "__main__":
  sys.exit(main())
