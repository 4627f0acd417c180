"""README examples run as written (file paths redirected to a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_nvme_example_runs(tmp_path) -> None:
    [block] = [b for b in python_blocks() if "NvmeDriver" in b]
    code = block.replace("/tmp/disk.img", str(tmp_path / "disk.img"))
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "disk.img").exists()


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _example_parser():
    import importlib.util

    path = README.parent / "examples" / "migrate_between_processes.py"
    spec = importlib.util.spec_from_file_location("migrate_between_processes_readme", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_main_job_is_the_migration_example() -> None:
    """The first Quick start command runs examples/migrate_between_processes.py, and the
    README's section on it names only options it has and shows its table's rows."""
    first = _section("Quick start").split("```\n")[1].splitlines()[0]
    assert first.endswith(" && .venv/bin/python examples/migrate_between_processes.py")
    example = _example_parser()
    section = _section("Live migration between processes")
    known = {opt for action in example.build_parser()._actions for opt in action.option_strings}
    named = set(re.findall(r"`(--[a-z-]+)", section))
    assert named and named <= known, named - known
    sample = section.split("```\n")[1]
    for row in ("median / max", "mismatches", "lost completions", "duplicated completions",
                "stops with a full CQ", "stops with AERs outstanding"):
        assert row in sample and row in Path(example.__file__).read_text(), row
