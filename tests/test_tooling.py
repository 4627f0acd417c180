"""The linters the project is held to: ruff and mypy (configured in pyproject.toml).

Each runs as a subprocess from this interpreter's environment over an explicit list
of paths. The lists grow as modules are brought under the checkers; the goal is all
of ``pcidev/`` (and ``plugins/``, ``tests/`` for ruff).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pcidev
from pcidev import _version

ROOT = Path(__file__).resolve().parent.parent

#: Modules held to ``mypy --strict`` (see [tool.mypy]).
MYPY_CHECKED = [
    "examples/bench_guest_memory.py",
    "pcidev/__init__.py",
    "pcidev/__main__.py",
    "pcidev/_native.pyi",
    "pcidev/_native_build.py",
    "pcidev/_version.py",
    "pcidev/bar.py",
    "pcidev/cli",
    "pcidev/device.py",
    "pcidev/devices",
    "pcidev/dma.py",
    "pcidev/errors.py",
    "pcidev/hookspecs.py",
    "pcidev/host",
    "pcidev/irq.py",
    "pcidev/migration/__init__.py",
    "pcidev/migration/channel.py",
    "pcidev/migration/function_state.py",
    "pcidev/migration/snapshot.py",
    "pcidev/native.py",
    "pcidev/pci/__init__.py",
    "pcidev/pci/capabilities",
    "pcidev/pci/config.py",
    "pcidev/pci/ids.py",
    "pcidev/properties.py",
    "pcidev/registry.py",
    "pcidev/transport/address.py",
    "pcidev/transport/fdpass.py",
    "pcidev/transport/vfio_user/__init__.py",
    "pcidev/transport/vfio_user/protocol.py",
    "pcidev/transport/vfio_user/server.py",
    "pcidev/vmstate",
]

#: Files and directories held to ``ruff check`` (see [tool.ruff]).
RUFF_CHECKED = [
    *MYPY_CHECKED,
    "tests/conftest.py",
    "tests/pcidev/migration",
    "tests/pcidev/pci",
    "tests/pcidev/test_bar.py",
    "tests/pcidev/test_cli.py",
    "tests/pcidev/test_dma.py",
    "tests/pcidev/transport/test_fdpass.py",
    "tests/pcidev/test_host.py",
    "tests/pcidev/test_irq.py",
    "tests/pcidev/test_native.py",
    "tests/pcidev/test_properties.py",
    "tests/pcidev/test_registry.py",
    "tests/test_architecture.py",
    "tests/test_packaging.py",
    "tests/test_readme.py",
    "tests/test_tooling.py",
    "tests/vmstate",
]


#: Every ``# type: ignore`` allowed in MYPY_CHECKED, as (path, error code): reason.
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
    for p in MYPY_CHECKED:
        path = ROOT / p
        files += sorted([*path.rglob("*.py"), *path.rglob("*.pyi")]) if path.is_dir() else [path]
    return files


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_passes() -> None:
    r = _run("ruff", "check", "--no-fix", *RUFF_CHECKED)
    assert r.returncode == 0, f"ruff check failed:\n{r.stdout}{r.stderr}"


def test_mypy_strict_passes() -> None:
    r = _run("mypy", *MYPY_CHECKED)
    assert r.returncode == 0, f"mypy failed:\n{r.stdout}{r.stderr}"


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
    missing = [p for p in RUFF_CHECKED if not (ROOT / p).exists()]
    assert not missing, f"checked paths that do not exist: {missing}"


def test_version_is_defined_once() -> None:
    assert pcidev.__version__ == _version.__version__ == importlib.metadata.version("pcidev")
