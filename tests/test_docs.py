"""The documentation site (docs/) builds without a warning, and the hooks page is complete.

The build is the one CI runs: ``python -m sphinx -W -n --keep-going -b html docs OUT``
(warnings are errors, every cross-reference must resolve).  It needs no network:
docs/conf.py fetches intersphinx inventories only when ``PCIDEV_DOCS_INTERSPHINX=1``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from sphinx.util.inventory import InventoryFile

from pcidev import hookspecs
from pcidev.cli import COMMANDS
from pcidev.properties import describe_config
from pcidev_nvme.config import NvmeConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
if str(DOCS / "_ext") not in sys.path:
    sys.path.insert(0, str(DOCS / "_ext"))
from pcidev_docs_api import (  # noqa: E402  (docs/_ext is not a package)
    canonical_module,
    documented_modules,
    reexports,
    undescribed,
)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML site once for this module; fail with Sphinx's warnings if it does not build."""
    out = tmp_path_factory.mktemp("docs-html")
    env = {k: v for k, v in os.environ.items() if k != "PCIDEV_DOCS_INTERSPHINX"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"sphinx-build failed (exit status {proc.returncode}); install the test extra "
            f"(pip install -e '.[test]') if Sphinx is missing.\n"
            f"--- stderr (warnings) ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout[-4000:]}",
            pytrace=False,
        )
    return out


def hookspec_names() -> list[str]:
    """Every hook specification of :mod:`pcidev.hookspecs`."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    names = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("pcidev_") and hasattr(fn, marker)]
    assert names, "no hook specification found in pcidev.hookspecs"
    return names


def test_docs_build_without_warnings(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "cli.html").is_file()


def test_every_hookspec_is_on_the_hooks_page(built_site: Path) -> None:
    page = (built_site / "hooks.html").read_text(encoding="utf-8")
    missing = [name for name in hookspec_names() if f'id="pcidev.hookspecs.{name}"' not in page]
    assert not missing, f"hook specifications missing from docs/hooks.rst: {missing}"


def test_cli_page_has_every_command(built_site: Path) -> None:
    page = (built_site / "cli.html").read_text(encoding="utf-8")
    missing = [name for name in COMMANDS if f">{name}<" not in page]
    assert not missing, f"commands missing from the generated CLI reference: {missing}"


def test_docs_link_only_inside_the_repository() -> None:
    outside = []
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        text = page.read_text(encoding="utf-8")
        if "../shared/" in text or "](../" in text:
            outside.append(str(page.relative_to(ROOT)))
    assert not outside, f"pages linking outside the repository: {outside}"


def _conf(monkeypatch: pytest.MonkeyPatch, intersphinx: str | None) -> dict[str, object]:
    if intersphinx is None:
        monkeypatch.delenv("PCIDEV_DOCS_INTERSPHINX", raising=False)
    else:
        monkeypatch.setenv("PCIDEV_DOCS_INTERSPHINX", intersphinx)
    monkeypatch.setattr(sys, "path", list(sys.path))   # conf.py adds docs/_ext
    namespace: dict[str, object] = {"__file__": str(DOCS / "conf.py")}
    exec(compile((DOCS / "conf.py").read_text(encoding="utf-8"), str(DOCS / "conf.py"), "exec"), namespace)
    return namespace


def test_intersphinx_only_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _conf(monkeypatch, None)["intersphinx_mapping"] == {}
    assert set(_conf(monkeypatch, "1")["intersphinx_mapping"]) == {"python", "pluggy", "attrs"}


def test_nitpick_ignores_never_cover_pcidev_names(monkeypatch: pytest.MonkeyPatch) -> None:
    patterns = _conf(monkeypatch, None)["nitpick_ignore_regex"]
    assert isinstance(patterns, list)
    for target in ("socket.socket", "pluggy.PluginManager", "attrs.Attribute", "collections.abc.Mapping"):
        assert any(re.fullmatch(t, target) for _, t in patterns), target
    for target in ("pcidev.device.PciDevice", "pcidev_nvme.config.NvmeConfig", "PciDevice", "Machine.plug"):
        assert not any(re.fullmatch(t, target) for _, t in patterns), target


#: The public modules that must each have an API page (docs/api/<module>.rst).
PUBLIC_MODULES = [
    "pcidev", "pcidev.device", "pcidev.bar", "pcidev.irq", "pcidev.dma", "pcidev.errors",
    "pcidev.properties", "pcidev.registry", "pcidev.plugins", "pcidev.hookspecs", "pcidev.vmstate",
    "pcidev.migration", "pcidev.pci.config", "pcidev.pci.capabilities", "pcidev.host",
    "pcidev.transport.address", "pcidev_nvme.config", "pcidev_nvme.backends", "pcidev.testing",
    "pcidev.worker", "pcidev.transport.vfio_user.client", "pcidev.transport.vfio_user.remote",
    "pcidev.regions", "pcidev.ratelog", "pcidev.images", "pcidev.pci.capabilities.vendor",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_module_has_an_api_page(built_site: Path, module: str) -> None:
    assert (DOCS / "api" / f"{module}.rst").is_file()
    page = (built_site / "api" / f"{module}.html").read_text(encoding="utf-8")
    assert f'id="module-{module}"' in page


# -- every public name is documented ----------------------------------------------------------

def _inventory_names(built_site: Path) -> set[str]:
    """The Python objects of the built site's ``objects.inv`` (what intersphinx sees)."""
    with open(built_site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    items = inventory.data.items() if hasattr(inventory, "data") else inventory.items()
    return {name for kind, entries in items if kind.startswith("py:") for name in entries}


def test_every_public_name_is_in_the_object_inventory(built_site: Path) -> None:
    """Each name of ``__all__`` of every module with an API page (docs/api/) is a documented
    object of the site, under the name users import it by."""
    documented = _inventory_names(built_site)
    missing = [f"{module}.{name}" for module in documented_modules()
               for name in getattr(importlib.import_module(module), "__all__", ())
               if f"{module}.{name}" not in documented]
    assert not missing, f"public names missing from the documentation's object inventory: {missing}"


def _documented() -> dict[str, object]:
    return {module: importlib.import_module(module) for module in documented_modules()}


def test_every_public_name_has_a_description() -> None:
    """Each name an API page documents says what it is: a class or function has a docstring,
    data (a constant, a type alias) a ``#:`` comment where it is assigned.  Without one,
    autodoc leaves data out; the docs extension then warns (failing the build)."""
    modules = _documented()
    missing = [f"{module}.{name}" for module in modules for name, _value in undescribed(module, modules)]
    assert not missing, (f"public names without a description (give data a '#:' comment on the line "
                         f"before its assignment, a class or function a docstring): {missing}")


def test_equal_constants_of_two_modules_are_two_names() -> None:
    """``msi.CTRL`` and ``msix.CTRL`` are both ``2``, one object: each is documented on its
    own module's page, neither is a re-export of the other."""
    modules = _documented()
    msi, msix = "pcidev.pci.capabilities.msi", "pcidev.pci.capabilities.msix"
    assert modules[msi].CTRL is modules[msix].CTRL
    for module in (msi, msix):
        assert canonical_module("CTRL", modules[module].CTRL, modules, module) == module
        assert "CTRL" not in {name for name, _role, _target in reexports(module, modules)}


def test_every_public_module_has_an_api_page() -> None:
    assert set(PUBLIC_MODULES) <= set(documented_modules())


# -- the docs' code runs ------------------------------------------------------------------------

#: An inline Python block in docs/**/*.md runs in a test unless the line right before its fence
#: is this marker with a reason: <!-- not-runnable: REASON -->.
NOT_RUNNABLE = re.compile(r"<!-- not-runnable: \S.* -->")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*(?:python|py|\{code-block\}\s+python|\{code\}\s+python)\s*$")


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """The inline Python blocks of a Markdown page: ``(line, code, runnable)`` in page order.

    :param page: a MyST page.
    :returns: one entry per fenced block whose language is Python.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, start = match.group(1), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            if not lines[i].startswith(":"):  # a directive option, not code
                body.append(lines[i])
            i += 1
        runnable = not (start > 0 and NOT_RUNNABLE.fullmatch(lines[start - 1].strip()))
        blocks.append((start + 1, "\n".join(body) + "\n", runnable))
        i += 1
    return blocks


def _doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def test_python_block_convention_is_recognised(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("```python\nx = 1\n```\n\n<!-- not-runnable: a sketch -->\n```python\nnope(\n```\n"
                    "```{code-block} python\n:caption: c\ny = 2\n```\n```\nnot python\n```\n", encoding="utf-8")
    assert python_blocks(page) == [(1, "x = 1\n", True), (6, "nope(\n", False), (9, "y = 2\n", True)]


@pytest.mark.parametrize("page", [p for p in _doc_pages() if any(run for _l, _c, run in python_blocks(p))],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_inline_python_blocks_run(page: Path, tmp_path: Path) -> None:
    """The runnable blocks of a page run in order, in one fresh interpreter, as one script."""
    blocks = python_blocks(page)
    script = "".join(f"# {page.name}:{line}\n{code}\n" for line, code, runnable in blocks if runnable)
    (tmp_path / "blocks.py").write_text(script, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "blocks.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"the Python blocks of {page.relative_to(ROOT)} failed:\n{proc.stderr}"


# -- generated reference ---------------------------------------------------------------------------

def test_nvme_reference_is_generated_from_the_code(built_site: Path) -> None:
    page = (built_site / "nvme-reference.html").read_text(encoding="utf-8")
    for prop in describe_config(NvmeConfig):
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{prop.name}" in page, prop.name
    for name in ("Doorbell Buffer Config", "Dataset Management", "Commands Supported and Effects",
                 "Host behavior support"):
        assert name in page, name


def test_diagrams_are_self_contained_svg() -> None:
    """Diagrams are hand-written SVG committed with the docs: well-formed, no external
    references (nothing is fetched or generated at build time)."""
    svgs = sorted(DOCS.rglob("*.svg"))
    assert svgs, "docs/images/architecture.svg is missing"
    for svg in svgs:
        root = ElementTree.parse(svg).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg", svg
        text = svg.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/", "") and "https://" not in text, svg
