"""The docs hold together: every page under docs/ is in mkdocs.yml's nav and every nav entry is a
page, every `bench/results/*.json` that README.md or a page names as a figure's source exists, and
the README's links into docs/ reach a page and a heading there.

`mkdocs build --strict` in .ci/run checks the links between pages; these checks cover what it
cannot see (the README is not a page, and a source path in code formatting is not a link).
"""

import pathlib
import re
import unicodedata

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A figure's source as the pages write it: a path in code formatting (or plain text).
SOURCE = re.compile(r"bench/results/[\w.\-/]+?\.json")
LINK = re.compile(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)")


def nav_pages(nav) -> list[str]:
  """Every page file named in an mkdocs nav tree (entries are 'file', {title: file} or {title: [...]})."""
  if isinstance(nav, str):
    return [nav]
  if isinstance(nav, list):
    return [page for entry in nav for page in nav_pages(entry)]
  if isinstance(nav, dict):
    return [page for value in nav.values() for page in nav_pages(value)]
  raise TypeError(f"mkdocs.yml nav: unexpected entry {nav!r}")


def missing_sources(text: str, root: pathlib.Path) -> list[str]:
  """The bench/results paths named in `text` that are not files under `root`."""
  return sorted({path for path in SOURCE.findall(text) if not (root / path).is_file()})


def slugify(heading: str) -> str:
  """A heading's anchor as Python-Markdown's toc (MkDocs) and GitHub both make it for plain text."""
  value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
  value = re.sub(r"[^\w\s-]", "", value).strip().lower()
  return re.sub(r"[-\s]+", "-", value)


def anchors(markdown: str) -> set[str]:
  """The anchors of a page's headings, outside fenced code (where '#' starts a shell comment)."""
  found, fenced = set(), False
  for line in markdown.splitlines():
    if line.lstrip().startswith("```"):
      fenced = not fenced
    elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
      found.add(slugify(m.group(1).replace("`", "")))
  return found


def broken_links(text: str, root: pathlib.Path) -> list[str]:
  """Links in `text` to docs/ files that do not exist, or to a heading the page does not have."""
  broken = []
  for target, anchor in LINK.findall(text):
    page = root / target
    if not page.is_file():
      broken.append(target)
    elif anchor and anchor not in anchors(page.read_text()):
      broken.append(f"{target}#{anchor}")
  return broken


def test_every_page_is_in_nav_and_every_nav_entry_is_a_page():
  config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
  assert config["theme"]["name"] == "material"
  in_nav = nav_pages(config["nav"])
  on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
  assert "index.md" in in_nav
  assert len(in_nav) == len(set(in_nav)), f"a page listed twice in nav: {in_nav}"
  assert sorted(set(on_disk) - set(in_nav)) == [], "pages missing from mkdocs.yml's nav"
  assert sorted(set(in_nav) - set(on_disk)) == [], "nav entries without a page under docs/"


def test_every_figure_source_exists():
  texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]}
  named = {path for text in texts.values() for path in SOURCE.findall(text)}
  # The pages carry the figures of some 25 result files; far fewer found means the pattern broke.
  assert len(named) >= 20, sorted(named)
  assert {name: missing_sources(text, ROOT) for name, text in texts.items() if missing_sources(text, ROOT)} == {}


def test_readme_links_reach_pages_and_headings():
  readme = (ROOT / "README.md").read_text()
  assert len(LINK.findall(readme)) >= 9  # a link to every page
  assert broken_links(readme, ROOT) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
  (tmp_path / "bench/results").mkdir(parents=True)
  (tmp_path / "bench/results/kept.json").write_text("{}")
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs/page.md").write_text("# Page\n\n## Real heading\n\n```bash\n# not a heading\n```\n")
  text = "P@5 0.43 (`bench/results/kept.json`), mAP 0.51 (`bench/results/gone.json`)"
  assert missing_sources(text, tmp_path) == ["bench/results/gone.json"]
  links = "[a](docs/page.md#real-heading) [b](docs/page.md#not-a-heading) [c](docs/none.md)"
  assert broken_links(links, tmp_path) == ["docs/page.md#not-a-heading", "docs/none.md"]
  assert nav_pages([{"Home": "index.md"}, {"Later": [{"Slides": "slides.md"}]}]) == ["index.md", "slides.md"]
  assert slugify("Scale out: TPU pods and GPU clusters") == "scale-out-tpu-pods-and-gpu-clusters"
