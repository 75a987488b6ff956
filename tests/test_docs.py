"""The docs build with Sphinx, warnings as errors (as CI builds them), and every page in
docs/ is reachable from the index: no page is left out of a toctree."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def pages() -> list[str]:
    return sorted(name[:-4] for name in os.listdir(DOCS) if name.endswith(".rst"))


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install .[test])")
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                             "-b", "html", DOCS, str(tmp_path / "html")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for page in pages():
        assert (tmp_path / "html" / f"{page}.html").is_file(), page


def test_no_page_is_an_orphan():
    """Sphinx -W fails on a page outside every toctree unless it says :orphan:; none may."""
    for page in pages():
        with open(os.path.join(DOCS, f"{page}.rst"), encoding="utf-8") as handle:
            assert ":orphan:" not in handle.read(), f"docs/{page}.rst is an orphan"
