"""The committed fuzz corpus, replayed through each target's run() (no atheris needed).

Every file under ``tests/fuzz/corpus/<target>/`` is one input: the seeds each target
builds and any input that once broke an invariant. An input of a finding that is not
fixed yet is listed in :data:`KNOWN_FINDINGS` and replayed as ``xfail(strict=True)``, so
the test flips (and the entry must go) when the fix lands.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing.fuzz import FuzzTarget, make_target, target_factories

CORPUS = Path(__file__).parent / "corpus"

#: "target/file" -> the finding it reproduces (not fixed yet)
KNOWN_FINDINGS: dict[str, str] = {}

_targets: dict[str, FuzzTarget] = {}


def _cases() -> list[object]:
    out: list[object] = []
    for path in sorted(CORPUS.glob("*/*")):
        key = f"{path.parent.name}/{path.name}"
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FINDINGS[key])] if key in KNOWN_FINDINGS else []
        out.append(pytest.param(path.parent.name, path, id=key, marks=marks))
    return out


@pytest.fixture(scope="module")
def registry():
    return load_registry(make_plugin_manager())


def test_every_target_has_a_corpus(registry):
    names = set(target_factories(registry))
    assert names <= {p.name for p in CORPUS.iterdir() if any(p.iterdir())}
    assert {p.name for p in CORPUS.iterdir()} <= names  # no corpus of a target that is gone


@pytest.mark.parametrize("target, path", _cases())
def test_corpus_input_keeps_every_invariant(registry, target, path):
    if target not in _targets:
        _targets[target] = make_target(registry, target)
        _targets[target].setup()
    _targets[target].run(path.read_bytes())  # a FuzzFinding is the failure, with its invariant


def teardown_module() -> None:
    for target in _targets.values():
        target.close()
    _targets.clear()
