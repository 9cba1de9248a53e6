"""The documentation runs: every ```python block of README.md and docs/*.md is executed in a
fresh Python process, unless the line directly before its fence is a
`<!-- not run: REASON -->` comment. Every relative link points at a file of the repository,
and the README stays short.

    python -m pytest -q tests/test_docs.py
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What the pages hold today: the tests fail if the parser finds fewer, so they cannot pass
# by finding nothing. Raise them when you add snippets.
RUNNABLE_AT_LEAST = 15
SNIPPETS_AT_LEAST = 17  # runnable and not run
README_MAX_LINES = 200
SNIPPET_TIMEOUT_S = 120

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")
MARKER = re.compile(r"<!--\s*not run\b")


@dataclass(frozen=True)
class Snippet:
    id: str  # page:Lline of the opening fence
    code: str
    reason: str | None  # why it is not run; None: it runs


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _python_blocks(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        assert i < len(lines), f"{_rel(path)}:L{start + 1}: a code fence is never closed"
        if opening["lang"] == "python":
            body = [line[len(indent):] if line.startswith(indent) else line
                    for line in lines[start + 1:i]]
            marker = NOT_RUN.match(lines[start - 1]) if start > 0 else None
            reason = marker["reason"].strip() if marker else None
            snippets.append(Snippet(f"{_rel(path)}:L{start + 1}", "\n".join(body) + "\n",
                                    reason))
        i += 1
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in _python_blocks(page)]
RUNNABLE = [snippet for snippet in SNIPPETS if snippet.reason is None]


def test_snippets_found():
    assert len(SNIPPETS) >= SNIPPETS_AT_LEAST, [s.id for s in SNIPPETS]
    assert len(RUNNABLE) >= RUNNABLE_AT_LEAST, (
        f"found {len(RUNNABLE)} runnable ```python blocks, expected at least "
        f"{RUNNABLE_AT_LEAST}: {[s.id for s in RUNNABLE]}")


def test_not_run_markers_give_a_reason_and_mark_a_python_block():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not MARKER.search(line):
                continue
            where = f"{_rel(page)}:L{number}"
            marker = NOT_RUN.match(line)
            assert marker, f"{where}: write the marker alone on its line as " \
                           "<!-- not run: REASON -->"
            assert marker["reason"].strip(), f"{where}: a not-run marker must give its reason"
            following = lines[number] if number < len(lines) else ""
            opening = FENCE.match(following)
            assert opening and opening["lang"] == "python", (
                f"{where}: a not-run marker must be the line directly before a ```python fence")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("DSD_BACKEND", None)  # the snippets run with the default selection, "auto"
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the suite, not by a user
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def kernels_built():
    """Build (or load) the C++ kernels once, outside the snippets' timeout: the first build
    on a fresh cache takes longer than a snippet may."""
    subprocess.run([sys.executable, "-c", "import dsd_kernels; dsd_kernels.available_backends()"],
                   cwd=ROOT, env=_env(), capture_output=True, timeout=1800, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", RUNNABLE, ids=[snippet.id for snippet in RUNNABLE])
def test_snippet_runs(snippet, tmp_path, kernels_built):
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code, encoding="utf-8")
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{snippet.id} ran longer than {SNIPPET_TIMEOUT_S} s")
    assert result.returncode == 0, (
        f"{snippet.id} failed (exit {result.returncode}):\n{snippet.code}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")


# Links: [text](target) and ![alt](target), outside code blocks and inline code.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _unfenced_lines(path: Path):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped (inline code
    keeps its text), spaces as hyphens, -1, -2, ... after repeats."""
    anchors, seen = set(), {}
    for _, line in _unfenced_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for number, line in _unfenced_lines(page):
            for target in LINK.findall(re.sub(r"(`+).*?\1", "", line)):  # not in inline code
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                path_part, _, anchor = target.partition("#")
                where = f"{_rel(page)}:L{number}: {target}"
                linked = (page.parent / path_part).resolve() if path_part else page
                if ROOT not in linked.parents or not linked.exists():
                    broken.append(where)
                elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
