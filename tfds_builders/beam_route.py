"""The Beam route of a tiled build: the local route's per-image work on any Beam runner.

`TiledBuilder` returns `prepare_split(...)` instead of a generator when TFDS is
given a Beam runner or options (`histojax.prepare --beam_runner`, or
`tfds build --beam_pipeline_options`). Each worker runs the same
`source_images.prepare_source` as the local route and TFDS's Beam writer orders the
examples by the same hashed keys, so both routes write the same records.

The local route counts drops and corrupt images in the generator; here they
are Beam metrics (counters, and a string set for the names of skipped corrupt
images), read back by `split_stats` once the pipeline has finished.

Slide builds (`tfds_builders.slides`) take one slide per element
(`prepare_slide_split`): the same `slide_sources.plan_slide` and patches as their
local route, streamed out of the element (a slide's patches are never held whole).
"""

from __future__ import annotations

from typing import Any, Sequence

import apache_beam as beam
from absl import logging
from apache_beam.metrics.metric import Metrics, MetricsFilter

from histojax import slides
from tfds_builders.slide_sources import SlideSpec, plan_slide, stop_message
from tfds_builders.source_images import (MAX_PIXELS, BuildError, ImageSpec, SourceImage, corrupt_image_error,
                                          prepare_source)

NAMESPACE = "histojax.prepare"
COUNTERS = ("source_images", "tiles_kept", "tiles_dropped", "images_without_tiles", "corrupt")


def _namespace(split: str) -> str:
  return f"{NAMESPACE}/{split}"


def prepare_examples(source: SourceImage, spec: ImageSpec, split: str, skip_corrupt: bool,
                     max_pixels: int = MAX_PIXELS) -> list[tuple[str, dict[str, Any]]]:
  """One source image's examples, counted; a corrupt image stops the job unless skipped."""
  result = prepare_source(source, spec, max_pixels)
  namespace = _namespace(split)
  if result.error:
    if not skip_corrupt:
      raise corrupt_image_error(result.error)
    logging.warning("skipping corrupt image: %s", result.error)
    Metrics.counter(namespace, "corrupt").inc()
    Metrics.string_set(namespace, "corrupt_skipped").add(source.path)
  counts = {"source_images": 1, "tiles_kept": len(result.examples), "tiles_dropped": result.dropped,
            "images_without_tiles": int(not result.examples and not result.error)}
  for name, value in counts.items():
    Metrics.counter(namespace, name).inc(value)
  return result.examples


@beam.ptransform_fn
def prepare_split(pipeline, sources: Sequence[SourceImage], spec: ImageSpec, split: str,
                  skip_corrupt: bool, max_pixels: int = MAX_PIXELS):
  # Create reshuffles its elements, so the images spread over the workers.
  return (pipeline
          | "Sources" >> beam.Create(list(sources))
          | "PrepareSource" >> beam.FlatMap(prepare_examples, spec=spec, split=split, skip_corrupt=skip_corrupt,
                                            max_pixels=max_pixels))


def slide_examples(source: SourceImage, spec: SlideSpec, split: str, skip_corrupt: bool):
  """One slide's examples, counted, streamed; a slide that cannot be opened stops the job unless skipped."""
  namespace = _namespace(split)
  Metrics.counter(namespace, "source_images").inc()
  try:
    plan = plan_slide(source, spec)
  except slides.NoTissueError as e:
    logging.warning("no tissue, no patch: %s", e)
    Metrics.counter(namespace, "images_without_tiles").inc()
    return
  except slides.SlideError as e:
    if not skip_corrupt:
      raise BuildError(stop_message(source, e)) from e
    logging.warning("skipping slide: %s", e)
    Metrics.counter(namespace, "corrupt").inc()
    Metrics.string_set(namespace, "corrupt_skipped").add(source.path)
    return
  Metrics.counter(namespace, "tiles_dropped").inc(plan.dropped)
  kept = Metrics.counter(namespace, "tiles_kept")
  for example in plan.examples():
    kept.inc()
    yield example


@beam.ptransform_fn
def prepare_slide_split(pipeline, sources: Sequence[SourceImage], spec: SlideSpec, split: str, skip_corrupt: bool):
  return (pipeline
          | "Slides" >> beam.Create(list(sources))
          | "PrepareSlide" >> beam.FlatMap(slide_examples, spec=spec, split=split, skip_corrupt=skip_corrupt))


def split_stats(result, split: str, sources: Sequence[SourceImage]) -> dict[str, Any]:
  """The local route's per-split record, from the finished pipeline's metrics."""
  metrics = result.metrics().query(MetricsFilter().with_namespace(_namespace(split)))
  counts = dict.fromkeys(COUNTERS, 0)
  counts.update({m.key.metric.name: _final(m) for m in metrics["counters"]})
  skipped = set().union(set(), *(_final(m) for m in metrics.get("string_sets", [])))
  if counts["source_images"] != len(sources):
    raise BuildError(
        f"split {split!r}: the Beam runner's metrics count {counts['source_images']} of {len(sources)} "
        "source images, so the drop and corrupt counts cannot be trusted; nothing was marked prepared. "
        "Use a runner that reports committed counters (Direct, Dataflow, Flink, Spark).")
  if len(skipped) < counts["corrupt"]:
    logging.warning("split %s: %d corrupt images skipped, the runner kept the names of %d", split,
                    counts["corrupt"], len(skipped))
  order = {s.path: i for i, s in enumerate(sources)}
  return {"source_images": counts["source_images"], "tiles_kept": counts["tiles_kept"],
          "tiles_dropped": counts["tiles_dropped"], "images_without_tiles": counts["images_without_tiles"],
          "corrupt_skipped": sorted(skipped, key=lambda p: order.get(p, len(order)))}


def _final(metric):
  # Committed values leave out retried bundles; runners that report none give attempted ones.
  return metric.committed if metric.committed is not None else metric.attempted
