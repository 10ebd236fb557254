"""Sphinx configuration of the fne-lightning documentation (``make docs``).

Pages are Markdown (MyST), readable on GitHub as they are; the API pages come from the code's
Google-style docstrings (autodoc + napoleon). The build runs with warnings as errors and needs no
network: no intersphinx inventories are fetched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Importing the package for autodoc must not start anything: no W&B, no GPU probing beyond torch's own.
os.environ.setdefault("WANDB_MODE", "offline")

project = "fne-lightning"
author = "the fne-lightning developers"
copyright = "2026, the fne-lightning developers"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "tools", "Thumbs.db", ".DS_Store"]

# MyST: `[text](page.md#heading)` links to headings up to level 4 (checked: a missing anchor warns).
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]

# autodoc: members in source order, type hints in the description, not the signature.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Shell prompts and output lines are not copied by the copy button.
copybutton_prompt_text = r"\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

html_theme = "furo"
html_title = "fne-lightning"
html_static_path = ["_static"]
smartquotes = False  # commands in prose stay copyable (no curly quotes)
html_css_files = ["custom.css"]
