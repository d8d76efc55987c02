"""Sphinx configuration for trio-connection-supervisor."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "trio-connection-supervisor"
author = "the trio-connection-supervisor developers"
copyright = "2026, " + author
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
exclude_patterns = ["_build"]
html_theme = "alabaster"
