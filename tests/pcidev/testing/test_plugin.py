"""The pytest plugin is installed with pcidev (entry point group ``pytest11``): a fresh
project's test file uses its fixtures without any conftest or configuration."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

FRESH_TEST = '''
def test_edu_answers(pcidev_device):
    edu = pcidev_device("edu")
    assert edu.ioread32(0, 0) == 0x010000ED
    edu.iowrite32(0, 0x08, 5)  # FACTORIAL
    assert edu.ioread32(0, 0x08) == 120
'''


@pytest.fixture
def fresh(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_PLUGINS", raising=False)
    pytester.makepyfile(test_fresh=FRESH_TEST)
    return pytester


def test_a_fresh_test_file_gets_the_fixtures(fresh: pytest.Pytester) -> None:
    result = fresh.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_plugin_can_be_turned_off(fresh: pytest.Pytester) -> None:
    result = fresh.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:pcidev")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'pcidev_device' not found*"])
