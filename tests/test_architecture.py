"""The layers of ARCHITECTURE.md, held against the code's own imports."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGES = ("histojax", "tfds_builders", "configs")
READ_PATH = ("histojax/query.py", "histojax/slide_query.py", "histojax/search.py")
WRITERS = ("histojax.indexing.writer", "histojax.indexing.growth", "histojax.indexing.curator")


def layers() -> dict[str, int]:
  """Room -> layer, from ARCHITECTURE.md's table."""
  table = {}
  for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
    found = re.match(r"\|\s*(\d+)\s*\|([^|]+)\|", line)
    if found:
      for room in found.group(2).split(","):
        table[room.strip()] = int(found.group(1))
  return table


def room(module: str) -> str:
  """'histojax.indexing.store' -> 'indexing'; 'tfds_builders.bach.x' -> 'tfds_builders'."""
  parts = module.split(".")
  return parts[1] if parts[0] == "histojax" and len(parts) > 1 else parts[0]


def modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      found[name.removesuffix(".__init__")] = path
  return found


def imports(path: pathlib.Path, known: dict) -> list[tuple[str, ast.stmt]]:
  """(imported project module, statement) of every import in the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(a.name, node) for a in node.names if a.name in known]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
      sub = [n for n in names if n in known]
      out += [(n, node) for n in sub] or ([(node.module, node)] if node.module in known else [])
  return out


def test_the_table_is_read_and_names_every_room():
  table, known = layers(), modules()
  assert len(table) >= 30 and table["untrusted"] == 0 and table["serve"] == 7
  rooms = {room(m) for m in known if m not in PACKAGES}
  assert rooms - set(table) == set(), "rooms missing from ARCHITECTURE.md's table"
  assert set(table) - rooms == set(), "ARCHITECTURE.md names rooms the code does not have"


def test_no_import_runs_back_up():
  table, known = layers(), modules()
  upward = []
  for name, path in known.items():
    if name in PACKAGES:
      continue
    for target, node in imports(path, known):
      if target not in PACKAGES and table[room(target)] > table[room(name)]:
        upward.append(f"{name} (layer {table[room(name)]}) imports {target} (layer {table[room(target)]}), "
                      f"line {node.lineno}")
  assert upward == []


def test_no_import_loop():
  known = modules()
  graph = {name: {t for t, _ in imports(path, known) if t not in PACKAGES} for name, path in known.items()}
  state, loops = {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        loops.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"
  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert loops == []


def test_late_imports_say_why():
  """An import inside a function carries a comment (on its line or the line above) saying why."""
  silent = []
  for name, path in modules().items():
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
        here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
        why = lambda line: re.sub(r"noqa(: *[A-Z0-9, ]+)?", "", line.partition("#")[2]).strip(" ()")
        under_main = any(l.startswith('if __name__ == "__main__"') for l in lines[:node.lineno])
        if not why(here) and not why(above) and not under_main:
          silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
  assert silent == []


def test_the_read_path_imports_nothing_that_writes():
  known = modules()
  for path in READ_PATH:
    targets = {t for t, _ in imports(ROOT / path, known)}
    assert targets & set(WRITERS) == set(), path


QUERY_PATH = """
import pathlib, shutil, sys, tempfile
from histojax import query
from histojax.data import images
fixture = pathlib.Path(sys.argv[1])
engine = query.QueryEngine.open(fixture / "workdir" / "index")
answer = engine.answer("q", images.read_image(str(fixture / "queries" / "class0.png"), max_pixels=10**8), 5)
assert answer["tiles_searched"] == 4 and answer["vote"]["label"] == "adipose", answer["vote"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("grain", "tensorflow_datasets", "apache_beam")
                or m in {WRITERS!r})
print("LOADED", loaded)
"""


def test_the_query_path_answers_without_grain_tfds_or_writers():
  """A QueryEngine opened on an index answers a query with no Grain, TFDS or Beam loaded, and
  nothing of the index's write side (importing the module alone is not enough to show it)."""
  fixture = ROOT / "tests" / "fixtures" / "compat"
  done = subprocess.run([sys.executable, "-c", QUERY_PATH.replace("{WRITERS!r}", repr(set(WRITERS))),
                         str(fixture)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "LOADED []" in done.stdout, done.stdout


@pytest.mark.parametrize("rule", ["upward", "loop"])
def test_the_checks_catch_a_bad_import(tmp_path, monkeypatch, rule):
  """The layer and loop checks fail on a planted violation (they are not vacuous)."""
  fake = {"histojax.metrics": tmp_path / "metrics.py", "histojax.serve": tmp_path / "serve.py"}
  fake["histojax.metrics"].write_text("from histojax import serve\n")
  fake["histojax.serve"].write_text("from histojax import metrics\n" if rule == "loop" else "\n")
  monkeypatch.setitem(globals(), "modules", lambda: fake)
  check = test_no_import_loop if rule == "loop" else test_no_import_runs_back_up
  with pytest.raises(AssertionError):
    check()
