"""docs/ documents every function, and nothing in the repository points outside it."""
from pathlib import Path

import tinyrecon as tr

ROOT = Path(__file__).parents[1]
OUTSIDE = ("../" + "shared", "/work/" + "shared", "SPEC" + ".md")   # split: this file must not match itself
TEXT = {".py", ".md", ".cpp", ".cu", ".cuh", ".toml", ".yaml", ".yml", ".txt", ""}


def test_docs_name_every_function():
    text = (ROOT / "docs" / "functions.md").read_text()
    for cls in tr.ALL:
        assert f"`{cls.__name__}`" in text, cls.__name__


def test_nothing_points_outside_the_repository():
    files = [p for d in ("src", "kernels", "csrc", "tests", "examples", "bench", "docs", ".ci")
             for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in TEXT and "__pycache__" not in p.parts]
    files += [ROOT / "README.md", ROOT / "setup.py", ROOT / "pyproject.toml"]
    assert len(files) > 30
    for path in files:
        text = path.read_text(errors="ignore")
        for needle in OUTSIDE:
            assert needle not in text, f"{path.relative_to(ROOT)} mentions {needle}"


def test_docs_links_resolve():
    import re
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"
