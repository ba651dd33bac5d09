"""The documentation cannot drift: the generated pages equal what their generators render now, the
README stays a front page, and every relative link in README.md and docs/ reaches a file (and, into
a Markdown page, a heading)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import tables
from pipeline import params_doc
from pipeline.config import Params, ProjectParams

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
# dated, machine-bound prose belongs in docs/ (with its date) or CHANGELOG.md, never on the front page
DATED = re.compile(r"20[0-9]{2}-[0-9]{2}-[0-9]{2}|this VM|second VM|\(was\)")
REGENERATE = "regenerate it: python -m pipeline.params_doc && python -m benchmarks.tables"


# --------------------------------------------------------------------------- generated pages


def test_parameters_doc_is_current():
    assert params_doc.DOC.read_text() == params_doc.render(), f"docs/parameters.md is stale; {REGENERATE}"


def test_parameters_doc_follows_the_field_descriptions(monkeypatch):
    """A description changed in config.py without regenerating makes the page stale."""
    field = ProjectParams.model_fields["experiment"]
    before = params_doc.render()
    monkeypatch.setattr(field, "description", "a description nobody wrote")
    after = params_doc.render()
    assert after != before and "a description nobody wrote" in after
    assert params_doc.DOC.read_text() != after


def test_parameters_doc_lists_every_key():
    text = params_doc.render()

    def keys(model, prefix=""):
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, Params.__base__):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield prefix, name

    for section, name in keys(Params):
        assert f"| `{name}` |" in text, f"{section}{name} is missing from docs/parameters.md"


def test_benchmarks_doc_is_current():
    assert tables.DOC.read_text() == tables.render(), f"docs/benchmarks.md is stale; {REGENERATE}"


def test_benchmarks_doc_takes_its_numbers_from_the_json(tmp_path):
    """A result that changes changes the page; non-JSON files are linked, not parsed, and a plot
    beside its JSON is shown."""
    results = tmp_path / "results"
    shutil.copytree(tables.RESULTS, results)
    path = results / "train_throughput_cpu_tiny.json"
    data = json.loads(path.read_text())
    data["rows"][1]["samples_per_s"] = 123456.0
    path.write_text(json.dumps(data))
    (results / "new_bench_cpu.json").write_text(json.dumps({"machine": "a test box", "rows": [{"a": 7777}]}))
    (results / "new_bench_cpu.png").write_bytes(b"")
    (results / "notes.log").write_text("not JSON")
    text = tables.render(results)
    assert text != tables.DOC.read_text()
    assert "| 32 | 2,048 | 64 | 8 | 123,456 |" in text
    assert "### `new_bench_cpu.json`" in text and "Machine: a test box." in text and "| 7,777 |" in text
    assert "](../benchmarks/results/new_bench_cpu.png)" in text
    assert "[`notes.log`](../benchmarks/results/notes.log)" in text


def test_check_flags_a_stale_page(tmp_path, monkeypatch):
    for module in (params_doc, tables):
        stale = tmp_path / f"{module.__name__}.md"
        monkeypatch.setattr(module, "DOC", stale)
        stale.write_text(module.render() + "an edit by hand\n")
        assert module.main(["--check"]) == 1
        stale.write_text(module.render())
        assert module.main(["--check"]) == 0


# --------------------------------------------------------------------------- the front page


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_has_no_dated_measurements():
    hits = [f"{n}: {line}" for n, line in enumerate(README.read_text().splitlines(), 1) if DATED.search(line)]
    assert not hits, "dated or machine-bound prose in README.md (move it to docs/ or CHANGELOG.md):\n" + "\n".join(hits)


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    assert "make pipeline   # " in text and "make test       # " in text


# --------------------------------------------------------------------------- links


def without_code(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    text = without_code(page.read_text())
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"<img[^>]*\bsrc=\"([^\"]+)\"", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces to '-')."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^(```|~~~).*?^\1", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](page.md#top) [gone](missing.md) ![img](nope.png) `[code](x.md)`\n"
                    "```\n[in a block](y.md)\n```\n[web](https://example.org)\n")
    assert links(page) == ["page.md#top", "missing.md", "nope.png"]
    assert anchors(page) == {"top"}
