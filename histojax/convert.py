"""Convert published weights into histojax's layout, for `config.init_from`.

    python -m histojax.convert --format clip --input ViT-B-16.pt --output /data/weights/clip_b16
    python -m histojax.convert --format timm_vit --input uni/pytorch_model.bin --output /data/weights/uni
    python -m histojax.convert --format torchvision_resnet --input resnet50-11ad3fa6.pth --output DIR
    python -m histojax.convert --format torchvision_resnet --input seresnet50.safetensors \\
        --model mixed_attention --allow_missing mask_ --output DIR
    python -m histojax.convert --format timm --preset uni2_h --input UNI2-h/ --output /data/weights/uni2_h
    python -m histojax.convert --format transformers --preset midnight --input midnight/ --output DIR

Reads `.safetensors`, `.npz` and PyTorch `.pt/.pth/.bin` files (zip, legacy
and TorchScript; no torch needed), infers the architecture from the tensor
shapes, maps every tensor onto that histojax backbone (or onto `--model`'s,
e.g. a trunk for the attention models), and writes an Orbax folder. The hub
formats (`timm`, `transformers`) read a downloaded weight folder instead
(config.json + weights) and take a `--preset` (`models.presets`): the folder's
config.json gives widths and depth, the preset what the model card passes in
code, the feature convention, the input transform and `gallery_mpp`. Any
missing, unexpected or mis-shaped key stops the conversion with all of them
listed. Then train or evaluate with `--config.init_from=DIR` and a model
config with the printed fields.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from histojax import models, untrusted, weights
from histojax.models import presets
from histojax.weights import hub, store


# Parameters of the largest backbone each format's published checkpoints fill (before
# the shapes are read, the model is not known yet): OpenCLIP ViT-bigG/14 towers
# (1.8B), timm ViT-g/14 foundation models such as Prov-GigaPath (1.1B), torchvision's
# wide_resnet101_2 (127M).
LARGEST_PUBLISHED = {"clip": 1_850_000_000, "timm_vit": 1_150_000_000, "torchvision_resnet": 130_000_000,
                     "timm": 1_150_000_000, "transformers": 1_150_000_000}
# A training checkpoint can hold the weights, two Adam moments and an EMA/teacher
# copy, in float32: 4 copies of 4 bytes per parameter.
BYTES_PER_PARAMETER = 16


def checkpoint_bound(format_name: str, model: str = "", max_checkpoint_gb: float = 0.0) -> int:
  """Bytes a checkpoint's tensors may declare before the reader refuses to read them:
  --max_checkpoint_gb if given, else BYTES_PER_PARAMETER x the parameters of --model,
  or of the largest published backbone of the format."""
  if max_checkpoint_gb:
    return int(max_checkpoint_gb * 2**30)
  params = LARGEST_PUBLISHED.get(format_name, max(LARGEST_PUBLISHED.values()))
  if model:
    params = models.parameter_count(models.abstract_model(models.model_config(model)).backbone)
  return max(BYTES_PER_PARAMETER * params, 1 << 30)


def target_config(fmt: weights.Format, tensors: dict, model: str = ""):
  """The model config the checkpoint is checked against: `model` (default: the
  inferred family) with every architecture field read off the shapes."""
  fields = fmt.infer(tensors)
  cfg = models.model_config(model or fields["name"])
  for name, value in fields.items():
    if name != "name" and name in cfg:
      cfg[name] = type(cfg[name])(value)
  return cfg, fields


def check_preset(fmt: weights.Format, preset: str, feature: str = "") -> presets.Preset:
  """The preset, if it exists, is published in `fmt` and offers `feature` (checked before any reading)."""
  spec = presets.get(preset)
  if spec.format != fmt.name:
    raise ValueError(f"preset {preset!r} is published as a {spec.format} folder: use --format {spec.format}")
  spec.model_fields(feature or None)
  return spec


def preset_config(fmt: weights.Format, preset: str, config: dict, tensors: dict, feature: str = ""):
  """The preset's model config with the architecture fields the folder's config.json gives."""
  spec = check_preset(fmt, preset, feature)
  fields = fmt.configure(spec, config, tensors)
  cfg = models.model_config(preset)
  cfg.update(fields)
  cfg.pool = spec.model_fields(feature or None)["pool"]
  return cfg, fields


def _preset_manifest(preset: str, cfg, config: dict) -> dict:
  spec = presets.get(preset)
  return {"preset": preset, "feature": cfg.pool, "gallery_mpp": spec.gallery_mpp, "hub_config": config,
          "input": {"size": spec.input_size, "resize": spec.resize, "norm": spec.input_norm,
                    "interpolation": spec.interpolation, "crop": spec.crop},
          "licence": spec.licence}


def convert(format_name: str, input_path: str, output: str, *, model: str = "", preset: str = "", feature: str = "",
            key: str = "", prefix: str = "", allow_missing: tuple[str, ...] = (),
            max_checkpoint_gb: float = 0.0) -> dict:
  """Writes `output` (weights + manifest) and returns the manifest. Nothing is written unless every
  tensor fits."""
  if format_name not in weights.FORMATS:
    raise ValueError(f"--format must be one of {sorted(weights.FORMATS)}, got {format_name!r}")
  fmt = weights.FORMATS[format_name]
  if fmt.configure is not None:  # a hub folder, completed by a preset
    if not preset:
      raise ValueError(f"--format {format_name} reads a hub folder and needs --preset, one of: "
                       f"{', '.join(n for n in presets.names() if presets.get(n).format == format_name)}")
    check_preset(fmt, preset, feature)
    config = hub.read_config(input_path)
    tensors, files = hub.read_weights(input_path, checkpoint_bound(format_name, preset, max_checkpoint_gb))
    cfg, fields = preset_config(fmt, preset, config, tensors, feature)
    extra = _preset_manifest(preset, cfg, config)
  else:
    if preset:
      raise ValueError(f"--preset applies to the hub folder formats (timm, transformers), not {format_name}")
    tensors = weights.read_state_dict(input_path, key=key, prefix=prefix,
                                      max_bytes=checkpoint_bound(format_name, model, max_checkpoint_gb))
    cfg, fields = target_config(fmt, tensors, model)
    files, extra = [input_path], {}
  abstract = models.abstract_model(cfg)
  imported = weights.import_tensors(abstract, tensors, fmt, source=input_path, allow_missing=allow_missing)
  digest, per_file = hub.fingerprint(files)
  manifest = {
      "format": fmt.name, "source": os.path.abspath(input_path), "source_sha256": digest,
      "model": cfg.to_dict(), "inferred": fields, "sources": imported.sources, "ignored": imported.ignored,
      "left_at_init": imported.left_at_init, "backbone_parameters": models.parameter_count(abstract.backbone),
      **({"source_files": per_file} if extra else {}), **extra,
  }
  return store.save(output, imported.values, manifest)


def input_transform(record: dict) -> str:
  """A manifest's `input` record in words: 'resize 256 (bicubic) + centre crop 224 px'."""
  how = record.get("interpolation", "bilinear")
  if record.get("crop", "center") == "squash":
    return f"resize to {record['size']}x{record['size']} px ({how})"
  return f"resize {record['resize']} ({how}) + centre crop {record['size']} px"


def summary(manifest: dict, output: str) -> str:
  model = manifest["model"]
  fields = ", ".join(f"{k}={model[k]!r}" for k in manifest["inferred"] if k != "name")
  lines = [f"converted {manifest['source']} ({manifest['format']}): {len(manifest['variables'])} variables, "
           f"{manifest['backbone_parameters']:,} backbone parameters -> {output}",
           f"model: {model['name']} with {fields}"]
  if manifest["ignored"]:
    reasons = sorted(set(manifest["ignored"].values()))
    lines.append(f"not imported: {len(manifest['ignored'])} tensors ({'; '.join(reasons)})")
  if manifest["left_at_init"]:
    lines.append(f"left at their fresh init: {len(manifest['left_at_init'])} variables "
                 f"(e.g. {manifest['left_at_init'][0]})")
  if "preset" in manifest:
    size = manifest["input"]
    lines.append(f"preset {manifest['preset']}: feature {manifest['feature']}, input {input_transform(size)}, "
                 f"normalisation {size['norm']}, gallery at "
                 f"{manifest['gallery_mpp']} um/px; licence: {manifest['licence']}")
  lines.append(f"use: base_config(model={model['name']!r}) with those fields and --config.init_from={output}")
  return "\n".join(lines)


def main(argv):
  """The command line; the work is `convert(...)`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  allow = tuple(p for p in FLAGS.allow_missing.split(",") if p)
  try:
    manifest = convert(FLAGS.format, FLAGS.input, FLAGS.output, model=FLAGS.model, preset=FLAGS.preset,
                       feature=FLAGS.feature, key=FLAGS.key, prefix=FLAGS.prefix, allow_missing=allow,
                       max_checkpoint_gb=FLAGS.max_checkpoint_gb)
  except (weights.CheckpointReadError, weights.WeightMismatchError, untrusted.CorruptFileError,
          FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    # A hostile, damaged or ill-fitting input: the message is the story, and nothing was written.
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    sys.exit(1)
  print(summary(manifest, FLAGS.output))


def define_flags() -> None:
  flags.DEFINE_enum("format", None, sorted(weights.FORMATS), "Published layout of --input.", required=True)
  flags.DEFINE_string("input", None, "Checkpoint file (.safetensors, .npz, .pt/.pth/.bin), or for --format "
                      "timm/transformers the downloaded weight folder.", required=True)
  flags.DEFINE_string("output", None, "New folder for the converted weights.", required=True)
  flags.DEFINE_string("model", "", "Registered model to load into; default inferred from the shapes.")
  flags.DEFINE_string("preset", "", "Published foundation model of a timm/transformers folder: "
                      + ", ".join(presets.names()) + ".")
  flags.DEFINE_string("feature", "", "The preset's feature convention if not its card's default "
                      "(e.g. token for Midnight's class token only).")
  flags.DEFINE_string("key", "", "Dotted path to the weights inside a wrapping checkpoint dict.")
  flags.DEFINE_string("prefix", "", "Keep only tensors whose names start with this, stripped (e.g. 'backbone.').")
  flags.DEFINE_string("allow_missing", "", "Comma-separated backbone variable prefixes that may stay freshly "
                      "initialised (e.g. 'mask_' for mixed_attention from SE-ResNet weights).")
  flags.DEFINE_float("max_checkpoint_gb", 0.0, "Refuse checkpoints whose tensors declare more than this many "
                     "GiB, before reading them; default 16 bytes per parameter of --model or of the "
                     "format's largest published backbone.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
