"""The pcidev command line: version, plugin listing, plugin selection, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest

import pcidev
from pcidev import cli, hookimpl
from pcidev.cli import COMMANDS, Command, main
from pcidev.device import PciDevice
from pcidev.errors import ConfigError

ACME_PLUGIN = """
from pcidev import hookimpl
from pcidev.device import PciDevice

class AcmeDevice(PciDevice):
    TYPE_NAME = "acme-dev"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x11E9
    CLASS_CODE = 0x00FF00

@hookimpl
def pcidev_register_devices(registry):
    registry.add_device(AcmeDevice)
    registry.add_component("acme-backend", "null", object)

@hookimpl
def pcidev_add_options(parser):
    parser.add_argument("--acme-trace", action="store_true", help="trace acme accesses")
"""


@pytest.fixture
def acme_dist(make_distribution):
    """A third-party distribution 'pcidev-acme 2.5' providing the plugin 'acme'."""
    make_distribution("pcidev-acme", "2.5", entry_points={"acme": "pcidev_acme_cli"},
                      modules={"pcidev_acme_cli": ACME_PLUGIN})


@pytest.fixture
def module_plugin(monkeypatch):
    """Put a module into sys.modules so that ``-p NAME`` can import it."""

    def install(name: str, **hooks: object) -> types.ModuleType:
        module = types.ModuleType(name)
        for hook_name, function in hooks.items():
            setattr(module, hook_name, function)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return install


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("pcidev: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


# -- version and help -----------------------------------------------------------------


def test_version(capsys):
    assert run(capsys, "--version") == (0, "pcidev 0.1.0\n", "")
    assert pcidev.__version__ == "0.1.0"


def test_version_works_even_when_a_plugin_is_broken(capsys, make_distribution):
    make_distribution("pcidev-broken", entry_points={"broken": "pcidev_cli_missing_mod"})
    assert run(capsys, "--version")[0] == 0
    status, _out, err = run(capsys, "plugins")
    assert status == 1
    assert_one_line_error(err, "plugin 'broken'", "pcidev_cli_missing_mod")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pcidev"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "pcidev 0.1.0\n", "")


def test_help_lists_commands_and_plugin_options(capsys, acme_dist):
    status, out, err = run(capsys, "-p", "no:nvme", "--help")
    assert status == 0 and err == ""
    for word in ("plugins", "demo", "-p no:NAME|MODULE", "plugin options", "--acme-trace"):
        assert word in out


# -- pcidev plugins -------------------------------------------------------------------


def ours(rows: list[dict], *names: str) -> list[dict]:
    """The rows of the plugins this test set up (other installed plugins may be listed too)."""
    return [row for row in rows if row["name"] in names]


def test_plugins_table_shows_distribution_and_device_types(capsys, acme_dist):
    status, out, err = run(capsys, "-p", "no:nvme", "plugins")
    assert status == 0 and err == ""
    known = ("PLUGIN", "builtin", "acme", "blocked:")
    lines = [line for line in out.splitlines() if line.split()[0] in known]
    assert lines[0].split() == ["PLUGIN", "DISTRIBUTION", "VERSION", "DEVICE", "TYPES"]
    assert lines[1].split() == ["builtin", "pcidev", pcidev.__version__, "edu"]
    assert lines[2].split() == ["acme", "pcidev-acme", "2.5", "acme-dev"]
    assert lines[3] == "blocked: nvme"
    assert lines[1].index("pcidev ") == lines[2].index("pcidev-acme")  # aligned columns


def test_plugins_json(capsys, acme_dist):
    status, out, err = run(capsys, "-p", "no:nvme", "-p", "no:builtin", "plugins", "--json")
    assert status == 0 and err == ""
    doc = json.loads(out)
    assert {"plugins": ours(doc["plugins"], "acme"), "blocked": doc["blocked"]} == {
        "plugins": [
            {
                "name": "acme",
                "distribution": "pcidev-acme",
                "version": "2.5",
                "device_types": ["acme-dev"],
                "components": ["acme-backend/null"],
            }
        ],
        "blocked": ["nvme", "builtin"],
    }


def test_plugins_with_nothing_loaded(capsys, monkeypatch):
    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PCIDEV_BLOCKED_PLUGINS", "builtin")
    assert run(capsys, "plugins") == (0, "no plugins loaded\nblocked: builtin\n", "")
    status, out, _ = run(capsys, "plugins", "--json")
    assert json.loads(out) == {"plugins": [], "blocked": ["builtin"]}


def test_block_option_hides_a_plugin(capsys, acme_dist):
    status, out, _ = run(capsys, "-p", "no:nvme", "-p", "no:acme", "plugins", "--json")
    assert status == 0
    listing = json.loads(out)
    assert [p["name"] for p in ours(listing["plugins"], "builtin", "acme", "nvme")] == ["builtin"]
    assert listing["blocked"] == ["nvme", "acme"]


def test_p_module_loads_an_extra_plugin(capsys, monkeypatch, module_plugin, make_device_class):
    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", "1")
    cls = make_device_class("inline-dev")

    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(cls)

    module_plugin("pcidev_cli_inline", pcidev_register_devices=pcidev_register_devices)
    status, out, _ = run(capsys, "-p", "no:builtin", "-p", "pcidev_cli_inline", "plugins", "--json")
    assert status == 0
    assert json.loads(out)["plugins"] == [
        {"name": "pcidev_cli_inline", "distribution": None, "version": None,
         "device_types": ["inline-dev"], "components": []}
    ]


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--no-such-option", "plugins"], "unrecognized arguments: --no-such-option"),
        (["plugins", "--yaml"], "unrecognized arguments: --yaml"),
        (["-p"], "argument -p: expected one argument"),
        (["-p", "no:", "plugins"], "-p no: needs a plugin name"),
        (["-p", "", "plugins"], "-p expects no:NAME or a module name"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, fragment):
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert_one_line_error(err, fragment)


def test_missing_p_module_exits_1(capsys):
    status, _out, err = run(capsys, "-p", "pcidev_cli_no_such_module", "plugins")
    assert status == 1
    assert_one_line_error(err, "pcidev_cli_no_such_module", "failed to import")


def test_misspelled_hook_in_p_module_exits_1(capsys, module_plugin):
    @hookimpl
    def pcidev_regster_devices(registry):
        pass

    module_plugin("pcidev_cli_typo", pcidev_regster_devices=pcidev_regster_devices)
    status, _out, err = run(capsys, "-p", "no:nvme", "-p", "pcidev_cli_typo", "plugins")
    assert status == 1
    assert_one_line_error(err, "unknown hook 'pcidev_regster_devices'", "'pcidev_cli_typo'")


def test_failing_registration_exits_1(capsys, module_plugin):
    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(int)

    module_plugin("pcidev_cli_badreg", pcidev_register_devices=pcidev_register_devices)
    status, _out, err = run(capsys, "-p", "no:nvme", "-p", "pcidev_cli_badreg", "plugins")
    assert status == 1
    assert_one_line_error(err, "plugin 'pcidev_cli_badreg' failed in pcidev_register_devices",
                          "not a subclass of pcidev.device.PciDevice")


def test_clashing_plugin_option_exits_1(capsys, module_plugin):
    @hookimpl
    def pcidev_add_options(parser):
        parser.add_argument("--version")

    module_plugin("pcidev_cli_clash", pcidev_add_options=pcidev_add_options)
    status, _out, err = run(capsys, "-p", "no:nvme", "-p", "pcidev_cli_clash", "plugins")
    assert status == 1
    assert_one_line_error(err, "plugin 'pcidev_cli_clash' failed in pcidev_add_options")


# -- command plumbing -----------------------------------------------------------------


@pytest.fixture
def probe_command(monkeypatch):
    """Register a throw-away subcommand that records what it receives."""
    seen: dict[str, object] = {}

    def configure(parser):
        parser.add_argument("--count", type=int, default=1)

    def run_probe(args, ctx):
        seen["args"] = args
        seen["ctx"] = ctx
        behaviour = seen.get("behaviour")
        if behaviour is not None:
            return behaviour()
        return 3

    monkeypatch.setitem(COMMANDS, "probe", Command("probe", "test probe", run_probe, configure))
    return seen


def test_command_receives_its_options_and_plugin_options(capsys, acme_dist, probe_command):
    status, _out, _err = run(capsys, "-p", "no:nvme", "--acme-trace", "probe", "--count", "7")
    assert status == 3
    args = probe_command["args"]
    assert (args.command, args.count, args.acme_trace) == ("probe", 7, True)
    ctx = probe_command["ctx"]
    assert ctx.pm.has_plugin("acme")
    assert ctx.registry is ctx.registry  # built once, on demand
    assert "acme-dev" in ctx.registry


def test_options_after_the_command_belong_to_the_command(capsys, monkeypatch, probe_command):
    def configure(parser):
        parser.add_argument("rest", nargs="*")
        parser.add_argument("-p", dest="pages")

    monkeypatch.setitem(COMMANDS, "probe", Command("probe", "probe", COMMANDS["probe"].run,
                                                   configure))
    status, out, _err = run(capsys, "-p", "no:nvme", "probe", "-p", "no:builtin")
    assert status == 3 and out == ""
    args = probe_command["args"]
    assert args.pages == "no:builtin"
    assert probe_command["ctx"].pm.has_plugin("builtin")
    assert probe_command["ctx"].pm.blocked_names() == ["nvme"]


def test_command_raising_pcidev_error_exits_1(capsys, probe_command):
    def fail():
        raise ConfigError("bad\nthing")

    probe_command["behaviour"] = fail
    status, _out, err = run(capsys, "-p", "no:nvme", "probe")
    assert status == 1
    assert_one_line_error(err, "pcidev: error: bad thing")


def test_unexpected_exception_is_one_line_not_a_traceback(capsys, probe_command):
    def crash():
        raise KeyError("surprise")

    probe_command["behaviour"] = crash
    status, _out, err = run(capsys, "-p", "no:nvme", "probe")
    assert status == 1
    assert_one_line_error(err, "internal error: KeyError")


def test_command_returning_none_exits_0(capsys, probe_command):
    probe_command["behaviour"] = lambda: None
    assert run(capsys, "-p", "no:nvme", "probe")[0] == 0


def test_commands_come_from_the_explicit_module_list():
    assert [m.COMMAND.name for m in cli.COMMAND_MODULES] == list(COMMANDS)
    assert {"plugins", "demo", "serve", "bench", "vmstate", "describe"} <= set(COMMANDS)

    @cli.command("hello", help="say hello")
    def hello(args, ctx):
        return 0

    assert hello == Command("hello", "say hello", hello.run, None)
    one = types.SimpleNamespace(COMMAND=hello)
    assert cli.commands_of([one]) == {"hello": hello}
    with pytest.raises(ValueError, match="defined twice"):
        cli.commands_of([one, one])


def test_demo_command_calls_pcidev_demo_main(capsys, monkeypatch):
    import pcidev.demo

    received = []
    monkeypatch.setattr(pcidev.demo, "main", lambda args, plugin_specs: received.append((args, plugin_specs)) or 4)
    status, _out, _err = run(capsys, "-p", "no:nvme", "-p", "no:other", "demo")
    assert status == 4
    assert received[0][0].command == "demo"
    assert received[0][1] == ("no:nvme", "no:other")


def test_demo_device_processes_get_the_plugin_selection(capsys):
    # edu is a built-in device type: blocked here, it must be blocked in the device processes too
    status, _out, err = run(capsys, "-p", "no:builtin", "demo")
    assert status == 1
    assert_one_line_error(err, "unknown device type 'edu'")


def test_closed_pipe_is_quiet() -> None:
    """``pcidev ... | head``: the reader going away is no internal error and no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "vmstate", "schema", "edu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 141


def test_python_dash_m_knows_every_command() -> None:
    import subprocess
    import sys

    for mod in ("pcidev", "pcidev.cli"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        for cmd in ("plugins", "demo", "bench", "vmstate"):
            assert cmd in out.stdout, (mod, cmd)


# -- every command honours -p ---------------------------------------------------------


@attrs.define(kw_only=True)
class ProbeConfig:
    width: int = attrs.field(default=4, metadata={"help": "bytes per access"})


class ProbeDevice(PciDevice):
    """A device only the -p module provides."""

    TYPE_NAME = "probe-dev"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x0001, 0xFF0000
    CONFIG_CLASS = ProbeConfig

    def __init__(self, config=None, *, name=None):
        self.cfg = config
        super().__init__(name=name)


@pytest.mark.parametrize("argv", [
    ["serve", "--vfio-user", "SOCK", "nvme,ns=mem:size=1M"],
    ["serve", "--vfio-user", "SOCK", "nvme,help"],
    ["describe", "nvme"],
    ["vmstate", "schema", "nvme"],
    ["bench", "nvme"],
])
def test_blocked_plugin_is_blocked_for_every_command(capsys, tmp_path, argv):
    argv = [str(tmp_path / "s.sock") if a == "SOCK" else a for a in argv]
    status, out, err = run(capsys, "-p", "no:nvme", *argv)
    assert status == 1 and out == ""
    assert_one_line_error(err, "nvme")
    assert not (tmp_path / "s.sock").exists()


def test_dash_p_module_reaches_serve_and_describe(capsys, module_plugin, tmp_path):
    def pcidev_register_devices(registry):
        registry.add_device(ProbeDevice)

    module_plugin("pcidev_cli_probe_dev", pcidev_register_devices=hookimpl(pcidev_register_devices))
    status, out, _err = run(capsys, "-p", "pcidev_cli_probe_dev", "describe", "probe-dev")
    assert status == 0 and "width" in out and "bytes per access" in out
    status, out, _err = run(capsys, "-p", "pcidev_cli_probe_dev", "serve", "--vfio-user",
                            str(tmp_path / "s.sock"), "probe-dev,help")
    assert status == 0 and "width" in out
    status, _out, err = run(capsys, "serve", "--vfio-user", str(tmp_path / "s.sock"), "probe-dev")
    assert status == 1 and "unknown device type 'probe-dev'" in err


# -- describe and TYPE,help -------------------------------------------------------------


def test_describe_lists_every_property_of_the_config_class(capsys):
    from pcidev_nvme.config import NvmeConfig

    status, out, err = run(capsys, "describe", "nvme")
    assert status == 0 and err == ""
    for field in attrs_fields(NvmeConfig):
        key = field.metadata.get("key", field.name)
        assert any(line.split()[:1] == [key] for line in out.splitlines()), key
        assert field.metadata["help"] in out
    assert "0x1b36" in out and "1T" in out and "KiB" in out
    status, out, _err = run(capsys, "describe", "--json", "edu")
    doc = json.loads(out)
    assert [p["name"] for p in doc["properties"]] == ["autorun", "engine", "chunk", "delay"]
    assert doc["properties"][2] == {"name": "chunk", "type": "size", "default": "4k",
                                    "help": "bytes the worker copies per step", "aliases": []}


@attrs.define(kw_only=True)
class _LaneOptions:
    lanes: int = attrs.field(default=1, metadata={"help": "lanes of one port"})


@attrs.define(kw_only=True)
class _GroupedConfig:
    port: list[str] = attrs.field(factory=list, metadata={"help": "a port, repeatable: lanes=N"})

    @classmethod
    def property_groups(cls):
        return [("port options (port=OPTION=VALUE,...)", _LaneOptions)]


class _GroupedDevice(PciDevice):
    """A device whose property values have options of their own."""

    TYPE_NAME = "grouped-dev"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x0002, 0xFF0000
    CONFIG_CLASS = _GroupedConfig

    def __init__(self, config=None, *, name=None):
        self.cfg = config
        super().__init__(name=name)


def test_describe_shows_the_option_groups_of_a_config_class(capsys, module_plugin):
    """A config class's property_groups() (the NVMe namespace options, say) are shown as
    tables of their own, in text and JSON."""
    def pcidev_register_devices(registry):
        registry.add_device(_GroupedDevice)

    module_plugin("pcidev_cli_grouped", pcidev_register_devices=hookimpl(pcidev_register_devices))
    status, out, _err = run(capsys, "-p", "pcidev_cli_grouped", "describe", "grouped-dev")
    lines = out.splitlines()
    heading = lines.index("port options (port=OPTION=VALUE,...):")
    assert lines[heading + 2].split()[:3] == ["lanes", "int", "1"] and "lanes of one port" in lines[heading + 2]
    status, out, _err = run(capsys, "-p", "pcidev_cli_grouped", "describe", "--json", "grouped-dev")
    assert json.loads(out)["groups"] == [{"heading": "port options (port=OPTION=VALUE,...)", "properties": [
        {"name": "lanes", "type": "int", "default": "1", "help": "lanes of one port", "aliases": []}]}]


def attrs_fields(cls):
    return [f for f in attrs.fields(cls) if "component" not in f.metadata]


def test_serve_type_help_prints_the_properties(capsys, tmp_path):
    status, out, _err = run(capsys, "serve", "--vfio-user", str(tmp_path / "s.sock"), "nvme,help")
    assert status == 0 and "max_ioqpairs" in out and "Maximum Data Transfer Size" in out
    assert not (tmp_path / "s.sock").exists()


def test_serve_bad_property_is_one_line(capsys, tmp_path):
    status, _out, err = run(capsys, "serve", "--vfio-user", str(tmp_path / "s.sock"), "nvme,mdts=lots")
    assert status == 1
    assert_one_line_error(err, "property 'mdts'", "0x hex")


def test_namespace_options_after_a_comma_point_at_the_colon_syntax(capsys, tmp_path):
    status, _out, err = run(capsys, "serve", "--vfio-user", str(tmp_path / "s.sock"), "nvme,ns=mem,size=64M")
    assert status == 1
    assert_one_line_error(err, "ns=mem:size=64M")
    assert "unknown NVMe namespace backend" not in err


# -- logging and --debug --------------------------------------------------------------


def test_log_level_and_verbose_configure_the_root_logger(capsys, probe_command):
    import logging

    run(capsys, "-p", "no:nvme", "probe")
    assert logging.getLogger().level == logging.WARNING
    run(capsys, "-p", "no:nvme", "-v", "probe")
    assert logging.getLogger().level == logging.INFO
    run(capsys, "-p", "no:nvme", "-vv", "probe")
    assert logging.getLogger().level == logging.DEBUG
    run(capsys, "-p", "no:nvme", "--log-level", "error", "probe")
    assert logging.getLogger().level == logging.ERROR
    status, _out, err = run(capsys, "--log-level", "loud", "probe")
    assert status == 2 and "--log-level" in err
    logging.getLogger().setLevel(logging.WARNING)


def test_log_records_reach_standard_error(capsys, probe_command):
    import logging

    probe_command["behaviour"] = lambda: logging.getLogger("pcidev.test").info("hello from the probe")
    run(capsys, "-p", "no:nvme", "probe")
    status, _out, err = run(capsys, "-p", "no:nvme", "-v", "probe")
    assert status == 0 and "pcidev.test: INFO: hello from the probe" in err
    logging.getLogger().setLevel(logging.WARNING)


def test_debug_prints_the_traceback_after_the_error_line(capsys, probe_command):
    def crash():
        raise KeyError("surprise")

    probe_command["behaviour"] = crash
    status, _out, err = run(capsys, "-p", "no:nvme", "probe")
    assert status == 1 and "--debug" in err and "Traceback" not in err
    status, _out, err = run(capsys, "--debug", "-p", "no:nvme", "probe")
    lines = err.splitlines()
    assert status == 1 and lines[0].startswith("pcidev: internal error: KeyError")
    assert lines[1].startswith("Traceback") and "surprise" in lines[-1]


def test_describe_a_type_without_properties(capsys, acme_dist):
    status, out, _err = run(capsys, "-p", "no:nvme", "describe", "acme-dev")
    assert status == 0 and out.splitlines()[-1] == "no properties"
    status, out, _err = run(capsys, "-p", "no:nvme", "describe", "--json", "acme-dev")
    assert json.loads(out) == {"device_type": "acme-dev", "properties": [], "groups": []}


def test_bench_component_that_is_not_callable_is_one_line(capsys, module_plugin):
    def pcidev_register_devices(registry):
        registry.add_component("bench", "broken", "not a function")

    module_plugin("pcidev_cli_broken_bench", pcidev_register_devices=hookimpl(pcidev_register_devices))
    status, out, err = run(capsys, "-p", "pcidev_cli_broken_bench", "bench", "broken")
    assert status == 1 and out == ""
    assert_one_line_error(err, "bench component 'broken' is not callable")


@pytest.mark.parametrize("level", ["--5", "²", "٥", "-", "1_0", "+", "", " ", "5x", "1" * 40, "Level 5"])
def test_a_bad_log_level_is_one_usage_line(capsys, level):
    status, _out, err = run(capsys, "--log-level", level, "plugins")
    assert status == 2
    assert_one_line_error(err, "--log-level")
    assert "internal error" not in err


@pytest.mark.parametrize(("level", "expected"), [("15", 15), ("-1", -1), (" 20 ", 20), ("Info", 20), ("warn", 30)])
def test_a_numeric_or_named_log_level_is_used(capsys, level, expected):
    import logging

    status, _out, _err = run(capsys, "--log-level", level, "plugins")
    assert status == 0
    assert logging.getLogger().level == expected
    logging.getLogger().setLevel(logging.WARNING)


# -- serve: the socket before the device ---------------------------------------------------


@attrs.define(kw_only=True)
class _MarkerConfig:
    marker: str = attrs.field(default="", metadata={"help": "a file the device creates when it is built"})
    fail: bool = attrs.field(default=False, metadata={"help": "fail to build"})


@pytest.fixture
def marker_device(monkeypatch, module_plugin):
    """``-p pcidev_cli_marker`` registers 'marker-dev' (writes a file when built) and 'plain-dev' (no properties)."""

    class MarkerDevice(PciDevice):
        TYPE_NAME = "marker-dev"
        VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11EA, 0xFF0000
        CONFIG_CLASS = _MarkerConfig

        def __init__(self, config: _MarkerConfig | None = None, *, name: str | None = None) -> None:
            config = config or _MarkerConfig()
            if config.marker:
                Path(config.marker).write_text("built")
            if config.fail:
                raise ConfigError("marker-dev: asked to fail")
            super().__init__(name=name)

    class PlainDevice(PciDevice):
        TYPE_NAME = "plain-dev"
        VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11EB, 0xFF0000

    @hookimpl
    def pcidev_register_devices(registry):
        registry.add_device(MarkerDevice)
        registry.add_device(PlainDevice)

    monkeypatch.setenv("PCIDEV_DISABLE_PLUGIN_AUTOLOAD", "1")
    module_plugin("pcidev_cli_marker", pcidev_register_devices=pcidev_register_devices)
    return ("-p", "pcidev_cli_marker")


@pytest.mark.parametrize("occupant", ["file", "directory"])
def test_serve_refuses_the_socket_path_before_building_the_device(capsys, tmp_path, marker_device, occupant):
    sock = tmp_path / "s.sock"
    if occupant == "file":
        sock.write_text("keep me")
    else:
        sock.mkdir()
    marker = tmp_path / "built"
    status, _out, err = run(capsys, *marker_device, "serve", "--vfio-user", str(sock), f"marker-dev,marker={marker}")
    assert status == 1
    assert_one_line_error(err, str(sock))
    assert not marker.exists()
    assert sock.exists() and (occupant == "directory" or sock.read_text() == "keep me")


def test_serve_closes_the_socket_when_the_device_fails_to_build(capsys, tmp_path, marker_device):
    sock = tmp_path / "s.sock"
    status, _out, err = run(capsys, *marker_device, "serve", "--vfio-user", str(sock), "marker-dev,fail=on")
    assert status == 1
    assert_one_line_error(err, "asked to fail")
    assert not sock.exists()
    status, _out, err = run(capsys, *marker_device, "serve", "--vfio-user", str(sock), "marker-dev,bogus=1")
    assert status == 1
    assert_one_line_error(err, "unknown property bogus", "known: marker, fail")
    assert not sock.exists()


def test_serve_a_type_without_config_class_says_how_to_declare_properties(capsys, tmp_path, marker_device):
    sock = tmp_path / "s.sock"
    status, _out, err = run(capsys, *marker_device, "serve", "--vfio-user", str(sock), "plain-dev,k=v")
    assert status == 1
    assert_one_line_error(err, "takes no properties", "CONFIG_CLASS", "Writing a plugin")
    assert not sock.exists()
