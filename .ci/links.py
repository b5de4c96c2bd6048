#!/usr/bin/env python3
"""Check the documentation's relative links: every `[text](path)` and `[text](path#anchor)` in
README.md, docs/*.md and bench/README.md must name a file of this repository (never one beside
it, such as ../shared/...), and every #anchor a heading of that page (GitHub's slugs). A
backticked path whose first folder is one of the repository's (`tests/simproc.py`,
`deploy/Dockerfile`) must exist too. No test framework, no network: `python3 .ci/links.py`,
exit 0 when every link resolves, 1 naming each one that does not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_PATH = re.compile(r"`([A-Za-z0-9_.-]+/[A-Za-z0-9_./-]*)`")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def pages() -> list[Path]:
    """The pages checked: the README, every page of docs/, the benchmarks' README."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/README.md"]
    return [page for page in found if page.is_file()]


def prose(page: Path) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings make (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    made = set()
    for _, line in prose(page):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        made.add(base if count == 0 else f"{base}-{count}")
    return made


def own_folders() -> set[str]:
    """The repository's own top-level folders: on disk, not ignored by .gitignore (runs/, a
    virtualenv), not hidden (but .ci)."""
    ignore = ROOT / ".gitignore"
    ignored = set()
    if ignore.is_file():
        ignored = {line.strip().strip("/") for line in ignore.read_text().splitlines()}
    return {
        path.name
        for path in ROOT.iterdir()
        if path.is_dir()
        and path.name not in ignored
        and (not path.name.startswith(".") or path.name == ".ci")
    }


def inside(path: Path) -> bool:
    """Whether a resolved path is in the repository."""
    return path == ROOT or ROOT in path.parents


def _exists(named: str) -> bool:
    """A path from the repository's root, or from the package's (`jobs/parse.py` is
    worker/jobs/parse.py in docs/architecture.md)."""
    return (ROOT / named).exists() or (ROOT / "worker" / named).exists()


def check(page: Path, folders: set[str]) -> list[str]:
    """What is wrong with one page's links, one line each."""
    problems: list[str] = []
    where = page.relative_to(ROOT)
    for number, line in prose(page):
        for target in LINK.findall(line):
            if target.startswith(EXTERNAL):
                continue
            name, _, anchor = target.partition("#")
            dest = (page.parent / name).resolve() if name else page
            if not inside(dest):
                problems.append(f"{where}:{number}: {target}: outside the repository")
            elif not dest.exists():
                problems.append(f"{where}:{number}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}:{number}: {target}: no heading makes #{anchor}")
        for named in CODE_PATH.findall(line):
            if named.startswith("../"):
                problems.append(f"{where}:{number}: `{named}`: outside the repository")
            elif named.split("/", 1)[0] in folders and not _exists(named):
                problems.append(f"{where}:{number}: `{named}`: no such file in the repository")
    return problems


def main() -> int:
    folders = own_folders()
    checked = pages()
    problems = [problem for page in checked for problem in check(page, folders)]
    for problem in problems:
        print(problem)
    names = ", ".join(str(page.relative_to(ROOT)) for page in checked)
    if problems:
        print(f"links: {len(problems)} broken in {names}")
        return 1
    print(f"links: every relative link resolves ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
