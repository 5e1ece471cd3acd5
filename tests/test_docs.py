"""The manual builds and names what exists: `mkdocs build --strict` passes over docs/, and every `ckpt_trace...`
name, repository path and relative link that README.md and docs/*.md give leads somewhere."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"(?<![\w./])ckpt_trace(?:\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"^(?:ckpt_trace|benchmarks|tests|figures|docs|\.ci)/[^\s<>*$]*$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_spans(page: Path) -> list[str]:
    """The inline code of a page, fenced blocks left out."""
    return CODE_SPAN.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def resolve(name: str) -> object:
    """Import the longest importable prefix of a dotted name, then take the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # not a module: a shorter prefix is; anything else missing is an error
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue
            raise
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(name)


def test_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", tmp_path / "site"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


def test_dotted_names_resolve():
    names = {(page.relative_to(ROOT).as_posix(), name) for page in PAGES for span in code_spans(page)
             for name in DOTTED.findall(span)}
    assert len(names) > 10  # the pattern finds what the pages name
    unresolved = []
    for page, name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            unresolved.append(f"{page}: {name} ({type(err).__name__}: {err})")
    assert unresolved == []


def test_repository_paths_and_links_exist():
    missing = []
    for page in PAGES:
        where = page.relative_to(ROOT).as_posix()
        for span in code_spans(page):
            path = span.split()[0]
            if REPO_PATH.match(path) and not (ROOT / path).exists():
                missing.append(f"{where}: `{span}`")
        if page.name == "README.md":  # mkdocs checks the links of docs/; nothing checks the README's
            for target in LINK.findall(page.read_text(encoding="utf-8")):
                file = target.split("#")[0]
                if file and "://" not in file and not (ROOT / file).exists():
                    missing.append(f"{where}: link {target}")
    assert missing == []


def test_getting_started_gives_the_readme_commands():
    readme = FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    set_up = [block for block in readme if "python3 -m venv .venv" in block]
    assert len(set_up) == 2  # the main job and the test command
    assert all(block in index for block in set_up)
