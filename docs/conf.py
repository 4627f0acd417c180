"""Sphinx configuration of the pcidev documentation.

Build: ``python -m sphinx -W -n --keep-going -b html docs docs/_build/html`` (the test
suite runs this, tests/test_docs.py).  The build needs no network: intersphinx
inventories (Python, pluggy, attrs) are fetched only when ``PCIDEV_DOCS_INTERSPHINX=1``;
without them, nitpicky warnings about references into those projects are ignored
(``nitpick_ignore_regex``), never references to pcidev's own names.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

from pcidev import __version__  # noqa: E402

project = "pcidev"
author = "the pcidev authors"
copyright = "the pcidev authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinxarg.ext",
    "pcidev_docs_api",
    "pcidev_docs_nvme",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = f"pcidev {release}"

# MyST: heading anchors so that [text](page.md#section) links resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc: members in source order, signatures with the annotations as written.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}

# intersphinx: only on request (CI has no network beyond the package registries).
if os.environ.get("PCIDEV_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "pluggy": ("https://pluggy.readthedocs.io/en/stable", None),
        "attrs": ("https://www.attrs.org/en/stable", None),
    }
else:
    intersphinx_mapping = {}

# References into the standard library, pluggy and attrs cannot be resolved without the
# inventories above; they are not pcidev's mistakes.  Only names under a standard-library
# module, ``pluggy`` or ``attrs``/``attr`` are ignored; pcidev's own names never are (builtins
# such as ``int`` or ``ValueError`` need no entry: Sphinx resolves them itself).
_STDLIB = "|".join(re.escape(name) for name in sorted(sys.stdlib_module_names))
nitpick_ignore_regex = [
    (r"py:.*", rf"(?:{_STDLIB})(?:\..+)?"),
    (r"py:.*", r"(?:pluggy|attrs|attr)(?:\..+)?"),
]
