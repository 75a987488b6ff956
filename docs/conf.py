"""Sphinx configuration for the mcastdeploy docs (built in CI with warnings as errors:
tests/test_docs.py runs ``sphinx-build -W -b html docs OUT``)."""

project = "mcastdeploy"
author = "the mcastdeploy authors"
copyright = "the mcastdeploy authors"
root_doc = "index"
extensions: list = []
exclude_patterns = ["_build"]
# Plain text blocks are shell sessions, configs and diagrams; guessing a lexer for each
# would only warn.
highlight_language = "none"
html_theme = "alabaster"
