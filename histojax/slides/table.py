"""slides.csv: each slide's case (patient) and label, and optionally its split.

    slide_id,case_id,label[,split]
    tumour_017,patient_04,Invasive,train

One reader for the `slides` builder and `index add --slides --slides_csv`. The slide
id is the slide file's stem (`slide_id`); `patient_id` is read as `case_id`. A row
missing a field, a slide listed twice, a split that is not train/validation/test,
or a file where some rows give a split and others do not is refused with
`SlideTableError`, naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import os

CASE_COLUMNS = ("case_id", "patient_id")
SPLIT_NAMES = ("train", "validation", "test")
MAX_BYTES = 64 << 20  # a million slides' rows; anything larger is not a slide table


class SlideTableError(ValueError):
  """A slides.csv that cannot be read as one; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class SlideRow:
  slide_id: str
  case_id: str
  label: str
  split: str  # "" when the table has no split column
  line: int


def read_slide_table(path) -> list[SlideRow]:
  """The rows of a slides.csv (see the module), checked."""
  path = os.fspath(path)
  try:
    if os.path.getsize(path) > MAX_BYTES:
      raise SlideTableError(f"{path}: {os.path.getsize(path):,} bytes is too large for a slide table")
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except FileNotFoundError:
    raise SlideTableError(f"{path}: no such slide table") from None
  except UnicodeDecodeError as e:
    raise SlideTableError(f"{path}: not a text file ({e})") from None
  return parse_slide_table(text, path)


def parse_slide_table(text: str, name: str = "slides.csv") -> list[SlideRow]:
  reader = csv.DictReader(text.splitlines())
  header = [h.strip() for h in reader.fieldnames or []]
  case_column = next((c for c in CASE_COLUMNS if c in header), None)
  if "slide_id" not in header or "label" not in header or case_column is None:
    raise SlideTableError(f"{name}: the header must name slide_id, case_id (or patient_id) and label, and "
                          f"optionally split; it has {header}")
  rows, seen = [], {}
  try:
    for line, raw in enumerate(reader, 2):
      cells = {(k or "").strip(): (v if isinstance(v, str) else "").strip() for k, v in raw.items()}
      if not any(cells.values()):
        continue
      row = _row(name, line, cells, case_column)
      if row.slide_id in seen:
        raise SlideTableError(f"{name} line {line}: slide {row.slide_id!r} is listed twice (line {seen[row.slide_id]})")
      seen[row.slide_id] = line
      rows.append(row)
  except csv.Error as e:
    raise SlideTableError(f"{name}: not a CSV file ({e})") from None
  if not rows:
    raise SlideTableError(f"{name} lists no slide")
  if len({bool(r.split) for r in rows}) > 1:
    raise SlideTableError(f"{name}: some rows give a split and others do not; give every slide's or none")
  return rows


def _row(name: str, line: int, cells: dict, case_column: str) -> SlideRow:
  row = SlideRow(cells.get("slide_id", ""), cells.get(case_column, ""), cells.get("label", ""),
                 cells.get("split", ""), line)
  empty = [c for c, v in (("slide_id", row.slide_id), (case_column, row.case_id), ("label", row.label)) if not v]
  if empty:
    raise SlideTableError(f"{name} line {line}: empty {', '.join(empty)}")
  if row.split and row.split not in SPLIT_NAMES:
    raise SlideTableError(f"{name} line {line}: split {row.split!r} is not one of {SPLIT_NAMES}")
  return row
