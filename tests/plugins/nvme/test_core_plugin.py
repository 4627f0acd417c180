"""The NVMe plugin's registration (through its entry point only), the configuration
class (QEMU-style property strings via cattrs), and a controller whose namespace uses a
backend contributed by another plugin."""

from __future__ import annotations

import importlib
import json
from importlib.metadata import version

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev import hookimpl
from pcidev.cli import main as cli_main
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev_nvme.backends import BaseBackend, add_backend
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver


def test_registered_through_the_entry_point():
    registry = load_registry(make_plugin_manager())
    entry = registry.entry("nvme")
    assert entry.cls is NvmeController and entry.plugin == "nvme" and entry.distribution == "pcidev-nvme"
    kinds = {(c.kind, c.name) for c in registry.components() if c.plugin == "nvme"}
    assert {("nvme-ns", "nvme-ns"), ("nvme-backend", "file"), ("nvme-backend", "mem"),
            ("nvme-backend", "null")} <= kinds
    assert "nvme" not in load_registry(make_plugin_manager(blocked=["nvme"]))


def test_pcidev_plugins_lists_nvme_with_its_own_distribution(capsys):
    """The plugin is installed as the distribution pcidev-nvme, not as part of pcidev."""
    assert cli_main(["plugins", "--json"]) == 0
    (nvme,) = [p for p in json.loads(capsys.readouterr().out)["plugins"] if p["name"] == "nvme"]
    assert nvme["distribution"] == "pcidev-nvme"
    assert nvme["version"] == version("pcidev-nvme")
    assert NvmeController.TYPE_NAME in nvme["device_types"]


def test_nvme_entry_point_metadata():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="pcidev") if ep.name == "nvme"]
    assert ep.value == "pcidev_nvme.plugin"
    assert ep.dist is not None and ep.dist.metadata["Name"] == "pcidev-nvme"
    assert ep.dist.version == version("pcidev-nvme")


def test_nvme_is_loaded_through_its_entry_point():
    pm = make_plugin_manager()
    plugin = pm.get_plugin("nvme")
    assert plugin is importlib.import_module("pcidev_nvme.plugin")
    assert pm.get_name(plugin) == "nvme"
    origin = pm.plugin_origin("nvme")
    assert (origin.distribution, origin.version) == ("pcidev-nvme", version("pcidev-nvme"))
    impl_owners = [i.plugin_name for i in pm.hook.pcidev_register_devices.get_hookimpls()]
    assert "nvme" in impl_owners


def test_nvme_registers_its_controller():
    registry = load_registry(make_plugin_manager())
    entry = registry.entry(NvmeController.TYPE_NAME)
    assert entry.cls is NvmeController
    assert (entry.plugin, entry.distribution) == ("nvme", "pcidev-nvme")


def test_config_parsing():
    cfg = NvmeConfig.parse("serial=abc,mdts=5,max_ioqpairs=0x10,msix_vectors=17,"
                           "ns=file:path=/tmp/x.img,size=1G,direct=on,dbbuf=off,ns=mem:size=64M,vendor_id=0x8086")
    assert cfg.serial == "abc" and cfg.mdts == 5 and cfg.max_ioqpairs == 16 and cfg.dbbuf is False
    assert cfg.namespaces == ["file:path=/tmp/x.img,size=1G,direct=on", "mem:size=64M"]
    assert cfg.vendor_id == 0x8086
    assert NvmeConfig.parse("model=a,,b").model == "a,b"
    assert NvmeConfig.from_dict({"capacity": "2G", "namespaces": "mem:size=1M"}).capacity == 2 << 30
    assert NvmeConfig.from_dict(cfg.unstructure()) == cfg
    # one grammar: hex and KiB..TiB for sizes, y/n for booleans
    cfg = NvmeConfig.parse("capacity=0x100000,dbbuf=n,ns=mem:size=64MiB")
    assert cfg.capacity == 1 << 20 and cfg.dbbuf is False and cfg.namespaces == ["mem:size=64MiB"]
    assert NvmeConfig.parse("capacity=2GiB").capacity == 2 << 30


def test_config_namespace_commas_round_trip(tmp_path):
    # ',,' inside a namespace spec stays a literal comma through both levels of the grammar
    cfg = NvmeConfig.parse(f"ns=file:path={tmp_path}/a,,b.img,size=1M,mdts=5,ns=mem:size=1M,lbaf=1")
    assert cfg.mdts == 5 and cfg.namespaces == [f"file:path={tmp_path}/a,,b.img,size=1M", "mem:size=1M,lbaf=1"]
    ctrl = NvmeController(cfg)
    try:
        assert ctrl.namespaces[1].backend.path == f"{tmp_path}/a,b.img"
        assert ctrl.namespaces[2].lba_size == 4096
    finally:
        ctrl.close()


def test_bad_namespace_option_is_one_config_error():
    with pytest.raises(ConfigError, match="property 'lbaf'.*integer") as info:
        NvmeController("ns=mem:size=1M,lbaf=\u00b2")
    assert "\n" not in str(info.value)


def test_describe_lists_every_namespace_and_backend_option(capsys):
    assert cli_main(["describe", "nvme"]) == 0
    out = capsys.readouterr().out
    for _heading, cls in NvmeConfig.property_groups():
        for field in attrs.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help"
            assert field.name in out, f"describe nvme does not mention {cls.__name__}.{field.name}"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=",=:ns0123456789abmelfuizMk", max_size=40))
def test_any_property_string_gives_a_config_or_one_config_error(text):
    try:
        NvmeConfig.parse(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("text, match", [
    ("bogus=1", "unknown property bogus"),
    ("mdts=x", "mdts"),
    ("mdts=21", "mdts=21"),
    ("serial=", "serial"),
    ("serial=" + "a" * 21, "longer than 20"),
    ("msix_bar=2", "msix_bar"),
    ("dbbuf=perhaps", "dbbuf"),
    ("mdts", "no '=value'"),
    ("mdts=1,mdts=2", "twice"),
    ("namespaces=mem", "ns=SPEC"),
    ("ns=mem,size=64M", "ns=mem:size=64M"),
    ("capacity=lots", "property 'capacity'.*KiB"),
    ("backends=x", "unknown property backends"),
])
def test_config_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        NvmeConfig.parse(text)


def test_controller_config_errors():
    with pytest.raises(ConfigError):
        NvmeController(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        NvmeController("ns=nosuchbackend:size=1M")


class _Pattern(BaseBackend):
    kind = "pattern"
    inline = True

    def __init__(self, size: int, byte: int) -> None:
        super().__init__(size)
        self.byte = byte

    def readv(self, views, offset):
        for v in views:
            v[:] = bytes([self.byte]) * len(v)

    def writev(self, views, offset, *, fua=False):
        raise OSError(30, "read-only pattern")


class PatternPlugin:
    __name__ = "pattern-plugin"

    @hookimpl
    def pcidev_register_devices(self, registry):
        def factory(options):
            size = int(options.pop("size"))
            return _Pattern(size, int(options.pop("byte", "0")))

        add_backend(registry, "pattern", factory)


def test_backend_from_another_plugin():
    registry = load_registry(make_plugin_manager(plugins=[PatternPlugin()]))
    ctrl = registry.create("nvme", "ns=pattern:size=1048576,byte=171")
    with Machine() as m:
        drv = NvmeDriver.attach(m, ctrl, aers=0)
        try:
            assert drv.read(1, 0, 2) == b"\xAB" * 1024
        finally:
            drv.close()
            ctrl.close()


def test_default_serial_unique_for_volatile_and_stable_for_images(tmp_path) -> None:
    """Two controllers without a serial never share one (Linux would refuse the second
    subsystem NQN); a file-backed controller gets the same one after a restart."""
    from pcidev_nvme.controller import NvmeController

    a, b = NvmeController("ns=mem:size=1M"), NvmeController("ns=mem:size=1M")
    try:
        assert a.cfg.serial != b.cfg.serial
        assert a.namespaces[1].nguid != b.namespaces[1].nguid
    finally:
        a.close()
        b.close()
    img = tmp_path / "disk.img"
    spec = f"ns=file:path={img},size=1M"
    first = NvmeController(spec)
    serial = first.cfg.serial
    first.close()
    again = NvmeController(spec)
    try:
        assert again.cfg.serial == serial and len(serial) <= 20 and serial.isascii()
    finally:
        again.close()
    explicit = NvmeController("serial=abc,ns=null:size=1M")
    try:
        assert explicit.cfg.serial == "abc"
    finally:
        explicit.close()


_KEYS = ["serial", "mdts", "max_ioqpairs", "capacity", "dbbuf", "ns", "namespace", "size", "msix_bar", ""]


@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.text(max_size=16)), max_size=6))
def test_any_property_string_is_a_config_or_one_config_error(pairs):
    text = ",".join(f"{k}={v}" if k else v for k, v in pairs)
    try:
        NvmeConfig.parse(text)
    except ConfigError:
        pass


@given(st.text(max_size=40))
def test_any_text_is_a_config_or_one_config_error(text):
    try:
        NvmeConfig.parse(text)
    except ConfigError:
        pass


def test_config_coerce_forms_and_serial():
    assert NvmeConfig.coerce("serial=abc,mdts=5").mdts == 5
    assert NvmeConfig.coerce({"serial": "abc"}).serial == "abc"
    cfg = NvmeConfig(serial="x")
    assert NvmeConfig.coerce(cfg) is cfg
    assert NvmeConfig.coerce(None).serial.startswith("PD")  # a default serial is chosen
    with pytest.raises(ConfigError, match="NvmeConfig, dict or str"):
        NvmeConfig.coerce(42)  # type: ignore[arg-type]
