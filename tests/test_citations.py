"""Every document a file of the project points a reader to is in the repository (docs/design.md §1)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a path-like reference to a project document: docs/….md, or a top-level *.md
DOCUMENT = re.compile(r"(?<![\w/.-])((?:docs/)?[A-Za-z][\w-]*\.md)\b")


def _tracked_text_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        path = ROOT / name
        if name == "tests/test_citations.py":  # its own patterns and paths are no citations
            continue
        if path.suffix in {".py", ".md", ".h", ".cpp", ".toml", ".ini", ".txt", ".yaml", ".cfg"} or name == "Makefile":
            yield name, path.read_text(encoding="utf-8", errors="replace")


def test_every_cited_document_exists():
    missing = []
    for name, text in _tracked_text_files():
        for match in DOCUMENT.finditer(text):
            cited = match.group(1)
            candidates = [ROOT / cited, (ROOT / name).parent / cited]
            if cited.startswith(("results", "gpu_check")) or any(c.exists() for c in candidates):
                continue
            missing.append(f"{name}: {cited}")
    assert not missing, "files cite documents that are not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_design_sections_cited_exist():
    """A citation `docs/design.md §N` (or 'section N') names a section that the document has."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.M))
    bad = []
    for name, text in _tracked_text_files():
        for number in re.findall(r"docs/design\.md (?:§|section )(\d+(?:\.\d+)?)", text):
            if number not in sections:
                bad.append(f"{name}: docs/design.md §{number}")
    assert sections and not bad, f"sections {sorted(sections)}; unknown citations: {bad}"
