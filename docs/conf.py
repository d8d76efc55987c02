"""Sphinx configuration for trio-connection-supervisor."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from supervisor import __version__

project = "trio-connection-supervisor"
author = "trio-connection-supervisor contributors"
copyright = "2026, " + author
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"{project} {release}"
