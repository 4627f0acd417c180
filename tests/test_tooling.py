"""The linters the project is held to: ruff and mypy (configured in pyproject.toml).

Each runs as a subprocess from this interpreter's environment over whole trees:
``mypy`` over the ``files`` of ``[tool.mypy]`` (all of ``pcidev/``), ``ruff check``
over :data:`RUFF_CHECKED` minus :data:`RUFF_EXCLUDED`. A new module is checked
from its first commit; there is no list to add it to.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pcidev
from pcidev import _version

ROOT = Path(__file__).resolve().parent.parent

#: The trees held to ``ruff check`` (see [tool.ruff]).
RUFF_CHECKED = ["pcidev", "plugins", "tests", "examples", "docs"]

#: Left out of the ruff run (nothing: keep it so).
RUFF_EXCLUDED: list[str] = []


def mypy_files() -> list[str]:
    """The paths ``mypy`` checks when run without arguments (``[tool.mypy] files``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files: list[str] = config["tool"]["mypy"]["files"]
    return files


#: Every ``# type: ignore`` allowed in the files mypy checks, as (path, error code): reason.
#: Only for third-party stubs that are wrong; anything else gets a typed fix instead.
ALLOWED_TYPE_IGNORES = {
    ("pcidev/vmstate/description.py", "arg-type"):
        "attrs' stub declares Factory a function (so that x: list[int] = Factory(list) checks); it is a class",
    ("pcidev/properties.py", "arg-type"):
        "attrs' stub declares Factory a function (so that x: list[int] = Factory(list) checks); it is a class",
}

_TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore(?:\[([^\]]*)\])?")


def _checked_files() -> list[Path]:
    files: list[Path] = []
    for p in mypy_files():
        path = ROOT / p
        files += sorted([*path.rglob("*.py"), *path.rglob("*.pyi")]) if path.is_dir() else [path]
    return files


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_check_passes() -> None:
    excluded = [arg for path in RUFF_EXCLUDED for arg in ("--extend-exclude", path)]
    r = _run("ruff", "check", "--no-fix", *excluded, *RUFF_CHECKED)
    assert r.returncode == 0, f"ruff check failed:\n{r.stdout}{r.stderr}"


def test_mypy_strict_passes() -> None:
    r = _run("mypy")  # the files of [tool.mypy]
    assert r.returncode == 0, f"mypy failed:\n{r.stdout}{r.stderr}"


def test_mypy_strict_passes_on_the_nvme_plugin() -> None:
    """The plugin distribution has its own [tool.mypy] (strict, paths relative to it)."""
    r = _run("mypy", cwd=ROOT / "plugins" / "nvme")
    assert r.returncode == 0, f"mypy (plugins/nvme) failed:\n{r.stdout}{r.stderr}"
    src = ROOT / "plugins" / "nvme" / "src"
    assert [p.name for p in src.rglob("*.py") if "type: ignore" in p.read_text()] == []


def test_mypy_strict_passes_on_the_virtio_plugin() -> None:
    """The example plugin distribution has its own [tool.mypy] too (strict, paths relative to it)."""
    plugin = ROOT / "examples" / "plugins" / "pcidev-virtio"
    r = _run("mypy", cwd=plugin)
    assert r.returncode == 0, f"mypy (examples/plugins/pcidev-virtio) failed:\n{r.stdout}{r.stderr}"
    assert [p.name for p in (plugin / "src").rglob("*.py") if "type: ignore" in p.read_text()] == []


def test_ruff_covers_the_virtio_plugin() -> None:
    """``examples`` is in RUFF_CHECKED: the plugin's sources and tests are linted with the rest."""
    assert any(Path("examples/plugins/pcidev-virtio").is_relative_to(p) for p in RUFF_CHECKED)


def test_type_ignores_are_the_allowed_ones() -> None:
    found = []
    for path in _checked_files():
        for line in path.read_text().splitlines():
            for m in _TYPE_IGNORE.finditer(line):
                for code in (m.group(1) or "").split(","):
                    found.append((path.relative_to(ROOT).as_posix(), code.strip()))
    assert sorted(found) == sorted(ALLOWED_TYPE_IGNORES), (
        "a new `# type: ignore` needs a typed fix, or a reason in ALLOWED_TYPE_IGNORES if a stub is wrong")


def test_checked_paths_exist() -> None:
    missing = [p for p in [*RUFF_CHECKED, *RUFF_EXCLUDED, *mypy_files()] if not (ROOT / p).exists()]
    assert not missing, f"checked paths that do not exist: {missing}"


def test_mypy_checks_all_of_pcidev() -> None:
    assert "pcidev" in mypy_files()


def test_version_is_defined_once() -> None:
    assert pcidev.__version__ == _version.__version__ == importlib.metadata.version("pcidev")
