"""The repository speaks of the code as it is: no development history, and no citation of a docs page or
section that does not exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# numbered work periods and tracker numbers; history belongs in CHANGELOG.md, by version
HISTORY = re.compile(r"\bsessions? \d+|\b(?:this|previous|earlier|next) session\b|\bissue[- ]#?\d+|\bissues? #?\d+(?!\.\d|\w)"
                     r"|\bwork period", re.IGNORECASE)
CITATION = re.compile(r"\b(docs/[\w-]+\.md)(#[\w-]+)?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
SELF = Path(__file__).name


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (the checks read the tracked files)")
    files = []
    for name in names.splitlines():
        path = REPO / name
        if path.is_file() and not path.is_symlink() and path.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch",
                                                                         ".toml", ".txt", ".json", ".cff", ""):
            files.append(path)
    return files


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    found = set()
    for line in page.read_text().splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[`*_]", "", match.group(1)).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def test_no_development_history_in_the_repository():
    hits = []
    for path in _tracked_text_files():
        if path.name in ("CHANGELOG.md", SELF):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line) or "REFERENCE §" in line or "REFERENCE.md §" in line:
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not hits, "development history or an old-style citation:\n" + "\n".join(hits)


def test_every_cited_docs_page_and_section_exists():
    dangling = []
    for path in _tracked_text_files():
        if path.name == SELF:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for page, anchor in CITATION.findall(line):
                target = REPO / page
                if not target.is_file() or (anchor and anchor[1:] not in _anchors(target)):
                    dangling.append(f"{path.relative_to(REPO)}:{number}: {page}{anchor}")
    assert not dangling, "citations of missing docs pages or sections:\n" + "\n".join(dangling)


def test_markdown_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "launch" / "README.md"]
    dangling = []
    for page in pages:
        for link in MARKDOWN_LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            file_part, _, anchor = link.partition("#")
            target = (page.parent / file_part).resolve() if file_part else page
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
                dangling.append(f"{page.relative_to(REPO)}: {link}")
    assert not dangling, "links to missing files or sections:\n" + "\n".join(dangling)


def test_the_history_check_sees_history(tmp_path):
    assert HISTORY.search("measured in session 8") and HISTORY.search("(issue 13)")
    assert not HISTORY.search("the session's time") and not HISTORY.search("pytest's session fixture")
