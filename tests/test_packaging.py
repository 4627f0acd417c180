"""Packaging and CI: pyproject package list, README quick start, .ci/run."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_RUN = ROOT / ".ci" / "run"


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _package_dirs(package: str, directory: Path) -> set[str]:
    found = set()
    for init in directory.rglob("__init__.py"):
        relative = init.parent.relative_to(directory)
        if any(part == "__pycache__" or part.startswith(".") for part in relative.parts):
            continue
        found.add(".".join([package, *relative.parts]))
    return found


def test_every_package_directory_is_listed_in_pyproject():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert "package-dir" not in setuptools  # pcidev only; the NVMe plugin has its own distribution
    on_disk = _package_dirs("pcidev", ROOT / "pcidev")
    listed = set(setuptools["packages"])
    assert sorted(on_disk - listed) == [], "package directories missing from pyproject.toml"
    assert sorted(listed - on_disk) == [], "pyproject.toml lists packages that do not exist"


def test_entry_point_and_script_are_declared():
    project = _pyproject()["project"]
    # pcidev itself registers no device plugin; it registers its pytest plugin (pcidev.testing)
    assert project["entry-points"] == {"pytest11": {"pcidev": "pcidev.testing.plugin"}}
    assert project["scripts"] == {"pcidev": "pcidev.cli:main"}


NVME = ROOT / "plugins" / "nvme"
VIRTIO = ROOT / "examples" / "plugins" / "pcidev-virtio"


def test_the_virtio_example_plugin_is_a_distribution_of_its_own():
    """examples/plugins/pcidev-virtio is shipped as a third party ships a plugin: its own
    pyproject, a dependency on pcidev, its entry point in the ``pcidev`` group, src layout,
    license, readme, type hints and tests."""
    with (VIRTIO / "pyproject.toml").open("rb") as f:
        doc = tomllib.load(f)
    project = doc["project"]
    assert project["name"] == "pcidev-virtio"
    assert project["entry-points"]["pcidev"] == {"virtio": "pcidev_virtio.plugin"}
    assert "pcidev" in {_requirement_name(d) for d in project["dependencies"]}
    assert doc["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    src = VIRTIO / "src" / "pcidev_virtio"
    assert (src / "plugin.py").is_file() and (src / "py.typed").is_file()
    assert (VIRTIO / "LICENSE").is_file() and (VIRTIO / "README.md").is_file()
    assert "examples/plugins/pcidev-virtio/tests" in _pyproject()["tool"]["pytest"]["ini_options"]["testpaths"]


def test_the_virtio_plugin_uses_only_the_public_api_and_declares_its_imports():
    """Only modules pcidev documents as public (docs/public-api.md), and declared dependencies."""
    with (VIRTIO / "pyproject.toml").open("rb") as f:
        deps = {_requirement_name(d) for d in tomllib.load(f)["project"]["dependencies"]}
    public = ("pcidev", "pcidev.device", "pcidev.bar", "pcidev.irq", "pcidev.dma", "pcidev.errors",
              "pcidev.pci.config", "pcidev.pci.capabilities", "pcidev.properties",
              "pcidev.registry", "pcidev.plugins", "pcidev.hookspecs", "pcidev.vmstate", "pcidev.migration",
              "pcidev.host", "pcidev.transport.address", "pcidev.transport.vfio_user.client",
              "pcidev.transport.vfio_user.remote", "pcidev.testing", "pcidev.regions")
    imported: set[str] = set()
    for path in (VIRTIO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
    private = sorted(m for m in imported if m.split(".")[0] == "pcidev"
                     and not any(m == p or m.startswith(p + ".") for p in public))
    assert private == []
    third_party = {m.split(".")[0] for m in imported} - {"pcidev", "pcidev_virtio", "__future__"}
    third_party = {m for m in third_party if m not in sys.stdlib_module_names}
    assert third_party <= deps, f"imported but not declared: {sorted(third_party - deps)}"


def test_getting_started_shows_the_quick_start_commands():
    lines = quick_start_lines((ROOT / "README.md").read_text())
    text = (ROOT / "docs" / "getting-started.md").read_text()
    assert all(line in text.splitlines() for line in lines)


def test_the_quick_start_installs_every_plugin_distribution():
    for line in quick_start_lines((ROOT / "README.md").read_text()):
        assert "-e ./plugins/nvme" in line and "-e ./examples/plugins/pcidev-virtio" in line


def test_the_nvme_plugin_is_a_distribution_of_its_own():
    """plugins/nvme is packaged like a third-party plugin: its own pyproject, a
    dependency on pcidev, its entry point in the ``pcidev`` group, src layout."""
    with (NVME / "pyproject.toml").open("rb") as f:
        doc = tomllib.load(f)
    project = doc["project"]
    assert project["name"] == "pcidev-nvme"
    assert project["entry-points"]["pcidev"] == {"nvme": "pcidev_nvme.plugin"}
    assert "pcidev" in {_requirement_name(d) for d in project["dependencies"]}
    assert doc["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    assert (NVME / "src" / "pcidev_nvme" / "plugin.py").is_file()
    assert (NVME / "LICENSE").is_file() and (NVME / "README.md").is_file()


def test_the_nvme_plugin_declares_the_libraries_it_imports():
    with (NVME / "pyproject.toml").open("rb") as f:
        deps = {_requirement_name(d) for d in tomllib.load(f)["project"]["dependencies"]}
    imported: set[str] = set()
    for path in (NVME / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported
                   if name not in sys.stdlib_module_names and name not in ("pcidev_nvme", "__future__")}
    assert third_party <= deps, f"imported but not declared: {sorted(third_party - deps)}"


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_dependencies_cover_the_libraries_in_use():
    project = _pyproject()["project"]
    names = {_requirement_name(d) for d in project["dependencies"]}
    assert {"pluggy", "attrs", "cattrs", "cffi"} <= names
    test_names = {_requirement_name(d) for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "hypothesis"} <= test_names


def quick_start_lines(readme: str) -> list[str]:
    """Return the lines of the first fenced code block after ``## Quick start``."""
    lines = readme.splitlines()
    start = lines.index("## Quick start")
    block: list[str] | None = None
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("```"):
            if block is not None:
                return block
            block = []
            continue
        if block is not None:
            block.append(line)
    raise AssertionError("no complete code block under '## Quick start'")


def test_readme_quick_start_has_two_venv_commands():
    lines = quick_start_lines((ROOT / "README.md").read_text())
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("python3 -m venv .venv && ")
        assert ".venv/bin/pip install" in line
        assert "-e '.[test]'" in line
    setup, main_job = lines[0].rsplit(" && ", 1)
    assert main_job == ".venv/bin/python examples/migrate_between_processes.py"
    setup2, tests = lines[1].rsplit(" && ", 1)
    assert setup2 == setup
    assert tests.startswith(".venv/bin/python -m pytest")


def test_ci_run_runs_the_second_quick_start_command():
    assert os.access(CI_RUN, os.X_OK)
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    result = subprocess.run([str(CI_RUN), "--print"], capture_output=True, text=True,
                            timeout=30, check=True)
    expected = quick_start_lines((ROOT / "README.md").read_text())[1]
    assert result.stdout == expected + "\n"


def _fake_repo(tmp_path: Path, second_line: str, *, extra_line: str | None = None) -> Path:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI_RUN, repo / ".ci" / "run")
    block = ["echo first", second_line] + ([extra_line] if extra_line else [])
    (repo / "README.md").write_text(
        "# x\n\n## Quick start\n\n```\n"
        + "\n".join(block)
        + "\n```\n\n## Later\n\n```\nnope\n```\n"
    )
    return repo


@pytest.mark.parametrize(
    ("second_line", "status"),
    [("touch ran && true", 0), ("touch ran && exit 3", 3), ("touch ran && exit 5", 1)],
)
def test_ci_run_exit_status(tmp_path, second_line, status):
    repo = _fake_repo(tmp_path, second_line)
    result = subprocess.run([str(repo / ".ci" / "run")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == status, result.stderr
    assert (repo / "ran").exists()  # ran in the repository root, whatever the cwd
    if status == 1:
        assert "collected no tests" in result.stderr


def test_ci_run_rejects_a_malformed_quick_start(tmp_path):
    repo = _fake_repo(tmp_path, "touch ran", extra_line="touch third")
    result = subprocess.run([str(repo / ".ci" / "run")], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 1
    assert "exactly two command lines" in result.stderr
    assert not (repo / "ran").exists()
