"""Indexes written by earlier histojax load and answer exactly as they did.

tests/fixtures/compat/ was written once by the code of commit 4207760
(tests/fixtures/make_compat_fixture.py says how): a quickstart:tiny workdir, its
evaluate index, the same gallery in modes exact and tree_ah, and a copy grown by
`index add` and `index remove`, with the answers that code gave. Every later
change to the index, query or growth code must keep these answers; this is the
format's compatibility gate for later issues too.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from histojax import search
from histojax import index as index_cli
from histojax.indexing import curator

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "compat"
INDEXES = {"workdir": "workdir/index", "exact": "indexes/exact", "tree_ah": "indexes/tree_ah",
           "grown": "indexes/grown"}


@pytest.fixture(scope="module")
def compat(tmp_path_factory) -> pathlib.Path:
  """A copy of the fixture (growth writes beside its index; the committed files stay as made)."""
  copy = tmp_path_factory.mktemp("compat") / "compat"
  shutil.copytree(FIXTURE, copy)
  return copy


def _answers(folder: pathlib.Path, workdir: pathlib.Path, queries: list[str]) -> list[dict]:
  found = []
  assert search.run(str(folder), queries, k=5, emit=found.append, workdir=str(workdir)) == 0
  for answer in found:
    answer["query"] = pathlib.Path(answer["query"]).name
  return found


def _same_answer(got: dict, want: dict) -> None:
  """Same rows, labels, sources, votes and tiling; scores equal to float32 rounding."""
  def strip(answer):
    return json.loads(json.dumps(answer), parse_float=lambda s: round(float(s), 4))
  assert strip(got) == strip(want)
  for tile_got, tile_want in zip(got["tiles"], want["tiles"]):
    scores = lambda tile: np.array([r["score"] for r in tile["results"]])
    np.testing.assert_allclose(scores(tile_got), scores(tile_want), atol=1e-5)


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_old_index_answers_as_it_did(compat, name):
  recorded = json.loads((compat / "answers.json").read_text())[name]
  queries = sorted(str(p) for p in (compat / "queries").glob("*.png"))
  got = _answers(compat / INDEXES[name], compat / "workdir", queries)
  assert [a["query"] for a in got] == [a["query"] for a in recorded]
  for answer, want in zip(got, recorded):
    _same_answer(answer, want)


def test_old_grown_index_grows_on(compat, tmp_path):
  """The new writer continues an index the old one grew: add, then remove what was added,
  and the answers are the recorded ones again (removal renumbers rows, so rows are compared
  by what they are: label, source and score)."""
  grown = tmp_path / "grown"
  shutil.copytree(compat / INDEXES["grown"], grown)
  queries = sorted(str(p) for p in (compat / "queries").glob("*.png"))
  adds = tmp_path / "adds" / "gland"
  adds.mkdir(parents=True)
  shutil.copy(queries[0], adds / "late.png")
  summary = index_cli.run_add(str(grown), [str(adds.parent)], workdir=str(compat / "workdir"))
  assert summary["rows_added"] == 4 and summary["rows_after"] == 56
  assert json.loads((grown / "manifest.json").read_text())["growth"]["generation"] == 3  # the old log goes on
  curator.remove(str(grown), ["late"])
  recorded = json.loads((compat / "answers.json").read_text())["grown"]
  for answer, want in zip(_answers(grown, compat / "workdir", queries), recorded):
    key = lambda a: [[(r["label"], r["source_id"], round(r["score"], 4)) for r in t["results"]] for t in a["tiles"]]
    assert key(answer) == key(want)
    assert answer["vote"] == want["vote"]
