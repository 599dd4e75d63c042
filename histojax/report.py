"""The evaluation report a pathologist can look at: PNGs and one HTML page (PIL only).

`<workdir>/eval/` gets
- `confusion.png`: true class (rows) against the majority vote of the top k
  (columns), per patch and per source image side by side; cells shaded by
  the row's fraction, so a class's errors read along its row;
- `retrieval_grid.png`: query patches down the left, their top-k gallery
  patches across, each result framed green when its label is the query's
  and red when not, with its label and similarity under it;
- `index.html`: the metric tables, per-class table and both figures;

and `format_table` is the metrics table evaluate prints.

Every file is written through `fileio` (beside its destination, renamed into place).
"""

from __future__ import annotations

import dataclasses
import html

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from etils import epath

from histojax import fileio, health, metrics

CORRECT, WRONG, QUERY = (26, 152, 80), (215, 48, 39), (69, 117, 180)
INK, PAPER, MUTED = (30, 30, 30), (255, 255, 255), (150, 150, 150)


@dataclasses.dataclass
class GridRow:
  query_image: np.ndarray  # uint8 HxWx3
  query_label: int
  query_source: str
  results: list  # per rank: (image uint8 HxWx3, label int, score float) or None past the gallery's end


def font(size: int) -> PIL.ImageFont.ImageFont:
  try:
    return PIL.ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
  except (TypeError, OSError):
    return PIL.ImageFont.load_default()


def _save_png(image: PIL.Image.Image, path: epath.Path) -> None:
  with fileio.atomic_open(path) as f:
    image.save(f, format="PNG")


def _text_width(draw, text: str, f) -> int:
  left, _, right, _ = draw.textbbox((0, 0), text, font=f)
  return right - left


def _fit(draw, text: str, f, width: int) -> str:
  """`text` cut (with an ellipsis) to fit `width` pixels."""
  if _text_width(draw, text, f) <= width:
    return text
  while len(text) > 1 and _text_width(draw, text + "…", f) > width:
    text = text[:-1]
  return text + "…"


# --- Confusion matrices --------------------------------------------------------

def _shade(fraction: float) -> tuple[int, int, int]:
  """White (0) to dark blue (1)."""
  low, high = np.array(PAPER, float), np.array((8, 48, 107), float)
  return tuple(int(v) for v in low + (high - low) * float(np.clip(fraction, 0, 1)))


def _vertical_text(text: str, f, height: int) -> PIL.Image.Image:
  probe = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
  text = _fit(probe, text, f, height)
  strip = PIL.Image.new("RGB", (height, f.size + 6 if hasattr(f, "size") else 16), PAPER)
  PIL.ImageDraw.Draw(strip).text((2, 1), text, fill=INK, font=f)
  return strip.rotate(90, expand=True)


def confusion_panel(matrix: np.ndarray, class_names: list[str], title: str) -> PIL.Image.Image:
  """One matrix [true, predicted (+ a 'none' column)] drawn with counts and row fractions."""
  n = len(class_names)
  columns = list(class_names) + (["none"] if matrix.shape[1] > n and matrix[:, n:].sum() else [])
  matrix = matrix[:, :len(columns)]
  cell = 56 if n <= 8 else 40 if n <= 16 else 30
  label_w, top_h, pad = 130, 110, 12
  small, big = font(11 if cell >= 40 else 9), font(15)
  width, height = label_w + cell * len(columns) + pad, top_h + cell * n + 40
  image = PIL.Image.new("RGB", (width, height), PAPER)
  draw = PIL.ImageDraw.Draw(image)
  draw.text((pad, 8), title, fill=INK, font=big)
  draw.text((pad, top_h - 18), "true \\ predicted", fill=MUTED, font=small)
  rows = np.maximum(matrix.sum(1, keepdims=True), 1)
  for j, name in enumerate(columns):
    image.paste(_vertical_text(name, small, top_h - 40), (label_w + j * cell + (cell - 16) // 2, 30))
  for i, name in enumerate(class_names):
    y = top_h + i * cell
    draw.text((pad, y + cell // 2 - 7), _fit(draw, name, small, label_w - pad - 4), fill=INK, font=small)
    for j in range(len(columns)):
      x, fraction = label_w + j * cell, matrix[i, j] / rows[i, 0]
      draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_shade(fraction), outline=(220, 220, 220))
      if matrix[i, j]:
        ink = PAPER if fraction > 0.5 else INK
        text = f"{matrix[i, j]}" if cell < 40 else f"{matrix[i, j]}\n{fraction:.0%}"
        draw.multiline_text((x + cell // 2, y + cell // 2), text, fill=ink, font=small, anchor="mm", align="center")
  draw.text((pad, top_h + n * cell + 12), "rows: true class; shade: fraction of the row", fill=MUTED, font=small)
  return image


def confusion_png(panels: list[tuple[str, np.ndarray]], class_names: list[str], path: epath.Path) -> None:
  images = [confusion_panel(matrix, class_names, title) for title, matrix in panels]
  out = PIL.Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), PAPER)
  x = 0
  for image in images:
    out.paste(image, (x, 0))
    x += image.width
  _save_png(out, path)


# --- Retrieval grid -------------------------------------------------------------------

def pick_grid_queries(query_labels: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
  """Query rows for the grid: every class in turn (round robin, random within a class,
  fixed seed), so rare classes show up, up to `max_rows`; sorted by class."""
  rng = np.random.default_rng(seed)
  pools = [rng.permutation(np.flatnonzero(query_labels == c)).tolist() for c in np.unique(query_labels)]
  chosen = []
  while len(chosen) < max_rows and any(pools):
    for pool in pools:
      if pool and len(chosen) < max_rows:
        chosen.append(pool.pop(0))
  chosen = np.asarray(chosen, np.int64)
  return chosen[np.argsort(query_labels[chosen], kind="stable")]


def _thumb(image: np.ndarray, size: int) -> PIL.Image.Image:
  return PIL.Image.fromarray(np.asarray(image, np.uint8)).convert("RGB").resize((size, size), PIL.Image.Resampling.LANCZOS)


def _framed(canvas, draw, image, x: int, y: int, size: int, colour, frame: int) -> None:
  draw.rectangle((x, y, x + size + 2 * frame - 1, y + size + 2 * frame - 1), fill=colour)
  canvas.paste(_thumb(image, size), (x + frame, y + frame))


def retrieval_grid_png(rows: list[GridRow], class_names: list[str], path: epath.Path,
                       thumb: int = 80, title: str = "") -> None:
  k = max((len(r.results) for r in rows), default=0)
  frame, gap, text_h, head_h, left_w = 4, 10, 30, 46, thumb + 2 * 4 + 16
  cell_w, cell_h = thumb + 2 * frame + gap, thumb + 2 * frame + text_h
  width = left_w + cell_w * k + gap
  canvas = PIL.Image.new("RGB", (width, head_h + cell_h * len(rows) + gap), PAPER)
  draw = PIL.ImageDraw.Draw(canvas)
  small, big = font(11), font(14)
  draw.text((gap, 6), title or "queries down, top-k across; green: same label as the query, red: other label",
            fill=INK, font=big)
  draw.text((gap, head_h - 16), "query", fill=QUERY, font=small)
  for rank in range(k):
    draw.text((left_w + rank * cell_w + thumb // 2, head_h - 16), f"{rank + 1}", fill=INK, font=small)
  name = lambda label: class_names[label] if 0 <= label < len(class_names) else str(label)
  for i, row in enumerate(rows):
    y = head_h + i * cell_h
    _framed(canvas, draw, row.query_image, gap, y, thumb, QUERY, frame)
    draw.text((gap, y + thumb + 2 * frame + 1), _fit(draw, name(row.query_label), small, left_w - gap), fill=QUERY, font=small)
    draw.text((gap, y + thumb + 2 * frame + 14), _fit(draw, row.query_source, small, left_w - gap), fill=MUTED, font=small)
    for rank, result in enumerate(row.results):
      x = left_w + rank * cell_w
      if result is None:
        draw.text((x + 4, y + thumb // 2), "no result", fill=MUTED, font=small)
        continue
      image, label, score = result
      colour = CORRECT if label == row.query_label else WRONG
      _framed(canvas, draw, image, x, y, thumb, colour, frame)
      draw.text((x, y + thumb + 2 * frame + 1), _fit(draw, name(label), small, cell_w - 4), fill=colour, font=small)
      draw.text((x, y + thumb + 2 * frame + 14), f"{score:.3f}", fill=MUTED, font=small)
  _save_png(canvas, path)


# --- HTML ------------------------------------------------------------------------------

def _number(value) -> str:
  return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"


def _ks(results: dict) -> list[int]:
  return sorted({int(key.split("@")[1]) for key in results if key.startswith("precision@")})


def metric_rows(results: dict) -> list[tuple[str, str, list]]:
  """(name, what it is, value per k) for every family in `results` (none for an unlabelled set)."""
  ks = _ks(results)
  if not ks:
    return []
  described = [
      ("precision", "relevant / returned in the top k, mean over queries"),
      ("accuracy", "a relevant result in the top k (hit@k, recall@k)"),
      ("map", "mean average precision within the top k"),
      ("majority_vote", "the top k's most frequent label is the query's"),
      ("image_majority_vote", "votes pooled over each source image's patches"),
      ("eta_p", "Kimia Path24 patch accuracy (majority vote at k)"),
      ("eta_w", "Kimia Path24 whole-scan accuracy: mean over classes"),
      ("eta_total", "eta_p x eta_w"),
  ]
  rows = []
  for family, what in described:
    if f"{family}@{ks[0]}" in results:
      rows.append((family, what, [results[f"{family}@{k}"] for k in ks]))
    if f"macro/{family}@{ks[0]}" in results:
      rows.append((f"macro {family}", "mean over classes of the per-class value",
                   [results[f"macro/{family}@{k}"] for k in ks]))
  return rows


def index_html(results: dict, class_names: list[str], figures: list[tuple[str, str]]) -> str:
  ks = _ks(results)
  e = html.escape
  head = "".join(f"<th>@{k}</th>" for k in ks)
  body = "".join(f"<tr><td>{e(name)}</td>{''.join(f'<td>{_number(v)}</td>' for v in values)}"
                 f"<td class=what>{e(what)}</td></tr>" for name, what, values in metric_rows(results))
  per_class = results.get("per_class", {})
  columns = [f"{f}@{k}" for f in ("precision", "accuracy", "map", "majority_vote") for k in ks]
  class_rows = "".join(f"<tr><td>{e(name)}</td>{''.join(f'<td>{_number(per_class[name].get(c))}</td>' for c in columns)}</tr>"
                       for name in class_names if name in per_class)
  pairs = "".join(f"<li>{e(key)}: {_number(results[key])}</li>" for key in
                  ("pair_c_index", "pair_concordance", "pair_threshold") if key in results)
  figs = "".join(f"<figure><img src='{e(src)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>"
                 for src, caption in figures)
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>histojax retrieval, step {results.get('step')}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
td.what{{text-align:left;color:#777}} figure{{margin:16px 0}} img{{max-width:100%;border:1px solid #eee}}</style></head>
<body><h1>Retrieval at step {results.get('step')}</h1>
<p>{results.get('num_query')} query patches ({e(str(results.get('query_split')))}) against
{results.get('num_gallery')} gallery patches ({e(str(results.get('gallery_split')))}) of {e(str(results.get('dataset')))};
index {e(str(results.get('index_mode')))}; own source image excluded: {results.get('exclude_same_source')}.</p>
<table><tr><th>metric</th>{head}<th></th></tr>{body}</table>
{_health_html(results.get("health"))}
<h2>Pairs</h2><ul>{pairs or '<li>not computed</li>'}</ul>
<h2>Per class</h2><table><tr><th>class</th>{''.join(f'<th>{e(c)}</th>' for c in columns)}</tr>{class_rows}</table>
{figs}</body></html>
"""


def _health_html(record: dict | None) -> str:
  """The gallery's spread and how the scores read (histojax.health), flagged when collapsed."""
  if not record:
    return ""
  collapsed = (record.get("gallery") or {}).get("collapsed")
  style = " style='color:#b00020;font-weight:bold'" if collapsed else ""
  return f"<h2>Embedding health</h2><p{style}>{html.escape(health.summary(record))}</p>"


def write_report(eval_dir: epath.PathLike, results: dict, class_names: list[str],
                 confusions: list[tuple[str, np.ndarray]], grid: list[GridRow], grid_title: str = "") -> dict:
  """Writes confusion.png, retrieval_grid.png and index.html; returns their paths."""
  eval_dir = epath.Path(eval_dir)
  eval_dir.mkdir(parents=True, exist_ok=True)
  confusion_png(confusions, class_names, eval_dir / "confusion.png")
  retrieval_grid_png(grid, class_names, eval_dir / "retrieval_grid.png", title=grid_title)
  figures = [("confusion.png", "Confusion: " + "; ".join(title for title, _ in confusions)),
             ("retrieval_grid.png", grid_title or "Queries and their top-k gallery patches")]
  page = eval_dir / "index.html"
  fileio.write_atomic(page, index_html(results, class_names, figures))
  return {"confusion": str(eval_dir / "confusion.png"), "grid": str(eval_dir / "retrieval_grid.png"), "html": str(page)}


# --- From retrieved rows: the report files and the printed table -----------------------

GRID_ROWS = 12  # queries in the retrieval grid: every class in turn


def draw_report(eval_dir: epath.Path, results: dict, gallery, query, neighbors: np.ndarray, scores: np.ndarray,
                class_names: list[str], k: int, read, seed: int = 0) -> dict:
  """Confusion matrices (per patch and per source image, majority vote at k) and the grid.

  `gallery`/`query` are exports (label, source_id); `read(split, row)` gives a patch's pixels.
  """
  retrieved = metrics.neighbor_labels(neighbors, gallery.label)
  num_classes = len(class_names)
  patch = metrics.confusion_matrix(query.label, metrics.majority_vote(retrieved, k), num_classes)
  _, image_truth = metrics.group_labels(query.label, query.source_id)
  _, image_vote, _ = metrics.pooled_vote(retrieved, query.source_id, k)
  image = metrics.confusion_matrix(image_truth, image_vote, num_classes)
  confusions = [(f"patches: majority vote @{k}", patch), (f"source images: pooled vote @{k}", image)]

  rows = pick_grid_queries(query.label, GRID_ROWS, seed)
  grid = [GridRow(read(results["query_split"], int(q)), int(query.label[q]), str(query.source_id[q]),
                  [None if n < 0 else (read(results["gallery_split"], int(n)), int(gallery.label[n]), float(s))
                   for n, s in zip(neighbors[q], scores[q])])
          for q in rows]
  title = (f"{results['query_split']} queries (down) and their top {k} {results['gallery_split']} patches "
           f"(across), own source image excluded; green: same class, red: other class")
  return write_report(eval_dir, results, class_names, confusions, grid, title)


def format_table(results: dict) -> str:
  """Rows per metric family (micro and macro), columns per k, then the pair metrics."""
  rows = metric_rows(results)
  ks = sorted({int(name.split("@")[1]) for name in results if name.startswith("precision@")})
  head = f"{'metric':<22}" + "".join(f"{'@' + str(k):>9}" for k in ks)
  lines = [f"retrieval at step {results['step']}: {results['num_query']} queries ({results['query_split']}) "
           f"against {results['num_gallery']} gallery patches ({results['gallery_split']}), "
           f"index {results['index_mode']}"]
  if rows:
    lines += [head, "-" * len(head)]
    lines += [f"{name:<22}" + "".join(f"{v:>9.4f}" for v in values) for name, _, values in rows]
  if "pair_c_index" in results:
    threshold = results["pair_threshold"]
    lines.append(f"pairs: c-index {results['pair_c_index']:.4f} at threshold "
                 f"{'(all one side)' if threshold is None else f'{threshold:.3f}'}, "
                 f"concordance {results['pair_concordance']:.4f} ({results['num_pairs']} pairs)")
  thunder = sorted({int(key.split("@")[1]) for key in results if key.startswith("thunder/accuracy@")})
  if thunder:
    lines.append("THUNDER k-NN (ties to the lowest class id), k=" + "/".join(map(str, thunder)) + ": " + "; ".join(
        f"{name} " + " ".join(f"{results[f'thunder/{name}@{k}']:.4f}" for k in thunder)
        for name in ("accuracy", "balanced_accuracy", "macro_f1")))
  if "health" in results:
    lines.append(health.summary(results["health"]))
  if "pair_task_held_out_c_index" in results:
    lines.append(f"pair task: c-index {results['pair_task_held_out_c_index']:.4f} held out on "
                 f"{results['pair_task_validation_pairs']} validation pairs; "
                 f"{results['pair_task_query_pairs']} query pairs answered in eval/pair_answers.csv")
  return "\n".join(lines)
