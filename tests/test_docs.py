"""The README stays a page a newcomer reads to the first served request, and no link in it or in
docs/ points at a file or a heading that is not there (moved text leaves links behind)."""
from __future__ import annotations

import re
from pathlib import Path
from contract.paths import ROOT

README = ROOT / "README.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code blanked: links and headings live
    there only."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(2).replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link in a markdown file whose file or anchor does not exist."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.relative_to(root)}: {target}: no file {file_part}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{path.relative_to(root)}: {target}: no heading #{anchor} in {file_part or path.name}")
    return problems


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_fits_a_few_screens():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_shows_the_two_commands_and_the_tiers():
    text = README.read_text(encoding="utf-8")
    for command in ("make demo", "make test", "make test-fast", "make lint"):
        assert re.search(rf"^{re.escape(command)}\b", text, re.M), f"README.md shows no `{command}` line"


def test_every_relative_link_resolves():
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_topic_page_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in markdown_files()[1:] if path.name != "README.md" and f"]({path.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading: `code`, too\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-heading-code-too) [gone](missing.md) [bad](other.md#nowhere)\n"
                    "```\n[in code](ignored.md)\n```\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "#nowhere" in problems[1]
