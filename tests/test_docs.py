"""The documentation site (docs/) builds without a warning, and the hooks page is complete.

The build is the one CI runs: ``python -m sphinx -W -n --keep-going -b html docs OUT``
(warnings are errors, every cross-reference must resolve).  It needs no network:
docs/conf.py fetches intersphinx inventories only when ``PCIDEV_DOCS_INTERSPHINX=1``.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcidev import hookspecs
from pcidev.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


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
    "pcidev.regions", "pcidev.pci.capabilities.vendor",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_module_has_an_api_page(built_site: Path, module: str) -> None:
    assert (DOCS / "api" / f"{module}.rst").is_file()
    page = (built_site / "api" / f"{module}.html").read_text(encoding="utf-8")
    assert f'id="module-{module}"' in page
