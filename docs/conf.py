"""Sphinx configuration of the pcidev documentation.

Build: ``python -m sphinx -W -n --keep-going -b html docs docs/_build/html`` (the test
suite runs this, tests/test_docs.py).  The build needs no network: intersphinx
inventories (Python, pluggy, attrs) are fetched only when ``PCIDEV_DOCS_INTERSPHINX=1``;
without them, nitpicky warnings about references into those projects are ignored
(``nitpick_ignore_regex``), never references to pcidev's own names.
"""

from __future__ import annotations

import os
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
# inventories above; they are not pcidev's mistakes.  pcidev's own names are never ignored.
_STDLIB_MODULES = (
    "abc|argparse|array|asyncio|collections|concurrent|contextlib|ctypes|dataclasses|datetime|enum|"
    "functools|io|ipaddress|itertools|logging|mmap|multiprocessing|os|pathlib|queue|re|selectors|"
    "signal|socket|socketserver|struct|subprocess|sys|tempfile|threading|time|types|typing|uuid|weakref|"
    "importlib|json|zlib|errno|select|fcntl|builtins|numbers|operator|random|shutil|string|textwrap|"
    "traceback|warnings|inspect|hashlib|binascii|math|copy|pickle|pprint|codecs|decimal|fractions|"
    "heapq|bisect|ssl|http|urllib|email|xml|unittest|_thread"
)
_BUILTINS = (
    "bool|bytes|bytearray|memoryview|int|float|complex|str|object|type|list|tuple|dict|set|frozenset|"
    "None|NoneType|Ellipsis|NotImplemented|slice|range|property|classmethod|staticmethod|callable|"
    "BaseException|Exception|ValueError|TypeError|KeyError|IndexError|LookupError|OSError|IOError|"
    "RuntimeError|NotImplementedError|AttributeError|ImportError|ModuleNotFoundError|EOFError|"
    "ConnectionError|BrokenPipeError|ConnectionResetError|ConnectionRefusedError|TimeoutError|"
    "FileNotFoundError|FileExistsError|PermissionError|InterruptedError|BlockingIOError|StopIteration|"
    "OverflowError|ArithmeticError|ZeroDivisionError|UnicodeError|UnicodeDecodeError|AssertionError|"
    "KeyboardInterrupt|SystemExit|Warning|DeprecationWarning|UserWarning|ResourceWarning|"
    "ChildProcessError|ProcessLookupError|IsADirectoryError|NotADirectoryError|BufferError|MemoryError|"
    "RecursionError|ReferenceError|GeneratorExit|ExceptionGroup|BaseExceptionGroup|SystemError"
)
nitpick_ignore_regex = [
    (r"py:.*", rf"(?:{_STDLIB_MODULES})(?:\..+)?"),
    (r"py:.*", rf"(?:builtins\.)?(?:{_BUILTINS})"),
    (r"py:.*", r"(?:pluggy|_pluggy)(?:\..+)?"),
    (r"py:.*", r"(?:attrs|attr)(?:\..+)?"),
]
