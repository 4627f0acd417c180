"""The migration hooks a plugin may implement besides the blockers: the summary of a
stopped device's state (pcidev_migration_summary) and a device type's standard
workload (pcidev_migration_workload), each called one plugin at a time."""

from __future__ import annotations

import pytest

from pcidev import hookimpl
from pcidev.errors import PluginError
from pcidev.plugins import hook_migration_summary, hook_migration_workload, make_plugin_manager
from pcidev.testing import Workload
from pcidev.testing.edu import DmaCopies


def _pm(*plugins):
    return make_plugin_manager(load_entrypoints=False, plugins=list(plugins))


def test_summaries_are_merged_and_the_first_plugin_keeps_its_key():
    class Queues:
        @hookimpl
        def pcidev_migration_summary(self, device):
            return {"cqs_full": 1, "shared": "queues"}

    class Events:
        @hookimpl
        def pcidev_migration_summary(self, device):
            return {"aers_outstanding": 4, "shared": "events"}

    class Other:
        @hookimpl
        def pcidev_migration_summary(self, device):
            return None  # not its device

    summary = hook_migration_summary(_pm(("queues", Queues()), ("events", Events()), ("other", Other())), object())
    assert summary["cqs_full"] == 1 and summary["aers_outstanding"] == 4
    assert summary["shared"] in ("queues", "events") and "error" not in summary


@pytest.mark.parametrize("returned", [["a list"], {1: "key not a string"}, "text"])
def test_a_malformed_summary_becomes_an_error_entry_naming_the_plugin(returned):
    class Bad:
        @hookimpl
        def pcidev_migration_summary(self, device):
            return returned

    summary = hook_migration_summary(_pm(("bad", Bad())), object())
    assert summary == {"error": summary["error"]}
    assert summary["error"].startswith("plugin 'bad' returned ") and "expected a dictionary" in summary["error"]


def test_a_failing_summary_never_raises():
    class Broken:
        @hookimpl
        def pcidev_migration_summary(self, device):
            raise RuntimeError("boom")

    summary = hook_migration_summary(_pm(("broken", Broken())), object())
    assert "broken" in summary["error"] and "boom" in summary["error"]


def test_the_builtin_plugin_provides_edu_s_workload_only():
    pm = _pm()
    work = hook_migration_workload(pm, "edu", {"qd": 8, "seed": 3}, Workload)
    assert isinstance(work, DmaCopies) and work.batch == 8 and work.seed == 3
    assert "engine=on" in work.properties
    assert hook_migration_workload(pm, "no-such-type", {}, Workload) is None


def test_a_workload_of_the_wrong_kind_is_blamed_on_its_plugin():
    class Wrong:
        @hookimpl
        def pcidev_migration_workload(self, device_type, options):
            return "not a workload"

    with pytest.raises(PluginError, match=r"plugin 'wrong' returned 'not a workload' .* expected a Workload"):
        hook_migration_workload(_pm(("wrong", Wrong())), "edu", {}, Workload)


def test_a_failing_workload_hook_is_a_plugin_error_naming_it():
    class Broken:
        @hookimpl
        def pcidev_migration_workload(self, device_type, options):
            raise KeyError("queues")

    with pytest.raises(PluginError, match="plugin 'broken' failed in pcidev_migration_workload"):
        hook_migration_workload(_pm(("broken", Broken())), "edu", {}, Workload)
