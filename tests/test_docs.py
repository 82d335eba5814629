"""The documentation's links: README.md is the front door, docs/ holds the rest, and every relative link and
#anchor between them (and in BENCHMARKS.md, bench/README.md, CONTRIBUTING.md) lands on a file and a heading
that exist, under GitHub's heading-slug rules. External links (http, https, mailto) are not followed."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, *(p for p in (ROOT / "BENCHMARKS.md", ROOT / "bench" / "README.md", ROOT / "CONTRIBUTING.md")
                           if p.is_file())]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...: another site's business


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with the brackets inside inline code spans blanked out (a
    `d[k](x)` in code is no link); the line count stays, so nothing else moves."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and marker and marker.group(1) == fence:
            fence = None
        elif fence is None:
            lines.append(INLINE_CODE.sub(lambda m: m.group(1) + re.sub(r"[\[\]()]", " ", m.group(2)) + m.group(1),
                                         line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text lowercased, punctuation but - and _ dropped,
    each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a markdown text; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text):
        if m := HEADING.match(line):
            base = slug(m.group(1))
            anchor = base if base not in seen else f"{base}-{seen[base]}"
            seen[base] = seen.get(base, 0) + 1
            out.add(anchor)
    return out


def links(text: str) -> list[str]:
    """The targets of the links and images in a markdown text, outside code."""
    return [m.group(1) for line in prose(text) for m in LINK.finditer(line)]


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of page that names no file or directory under root, or an #anchor that no
    heading of its target file makes."""
    text, problems = page.read_text(), []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
        elif anchor and dest.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that is not markdown")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands_on_a_file_and_a_heading(page):
    assert link_problems(page) == []


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(README.read_text())
              if not EXTERNAL.match(t)}
    assert DOCS, "docs/ holds no pages"
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_the_readme_stays_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move the detail into docs/"
    assert lines[0] == "# senet-job"


def test_each_page_in_docs_links_back_to_the_readme():
    assert [p.name for p in DOCS if "../README.md" not in links(p.read_text())] == []


def test_the_checker_finds_a_broken_link(tmp_path):
    """The checker itself: a missing file, a missing anchor (same page and another), and none of the links
    that are fine — a heading's anchor with its punctuation dropped, a repeated heading's -1, an image, an
    external link, and a link inside a code block or span."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "fig.png").write_bytes(b"")
    (tmp_path / "docs" / "a.md").write_text("# Restarts, preemption and preflight\n\n## Hangs\n\n## Hangs\n\n"
                                            "```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n"
                    "[fine](docs/a.md#restarts-preemption-and-preflight) [again](docs/a.md#hangs-1) "
                    "![fig](docs/fig.png) [out](https://example.com/#x) [me](#top) [mail](mailto:a@b.c)\n"
                    "`[code](docs/missing.md)`\n\n```\n[fenced](docs/missing.md)\n```\n"
                    "[gone](docs/missing.md) [bad anchor](docs/a.md#hangs-2) [here](#nowhere) "
                    "[heading in code](docs/a.md#not-a-heading)\n")
    assert link_problems(page, tmp_path) == [
        "README.md: (docs/missing.md): no such file",
        "README.md: (docs/a.md#hangs-2): no heading #hangs-2 in docs/a.md",
        "README.md: (#nowhere): no heading #nowhere in README.md",
        "README.md: (docs/a.md#not-a-heading): no heading #not-a-heading in docs/a.md",
    ]


def test_slugs_follow_github():
    assert slug("Restarts, preemption and preflight") == "restarts-preemption-and-preflight"
    assert slug("`job.train` — the *entry*") == "jobtrain--the-entry"
    assert slug("Train on CIFAR-10") == "train-on-cifar-10"
    assert slug("[Linked](x.md) heading_name") == "linked-heading_name"
