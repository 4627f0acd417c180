"""Migration of a physical function's virtual functions (the ``pcidev/sriov`` section).

A PF with an SR-IOV capability (:mod:`pcidev.sriov`) saves one more section, after
its own: :class:`SriovState`, one entry per live VF, VF 0 first. Each entry is the
VF's own saved device (its framework section and its type's sections, a complete
vmstate stream, as :func:`~pcidev.migration.save_device_stream` writes for any
device) and the descriptors that stream names, carried with the PF's (``FdRef``).
Over a channel without descriptors (TCP, vfio-user migration data) a VF's RAM BARs
travel as memory sources of the PF (``"vf<k>/bar<N>"``,
:meth:`~pcidev.device.PciDevice.memory_sources`) and each VF's load gets the staging
memfds of its own names (:func:`load_vfs`).

On load the PF's configuration space (VF Enable, NumVFs, the VF BARs) has already
been applied with the framework section, and the PF's own section too: the VFs are
then built aside with the PF's factory (without the guest-visible VF Enable transition),
each loads its stream, and only then do they replace the live VFs. A failed load of any
VF closes what was built and leaves the live VFs as they were (the rollback copy of the
section, whose streams name descriptors it does not carry, then keeps them), and the
framework puts the PF back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.memory_source import ContentDescriptors
from pcidev.migration.function_state import LoadedResources
from pcidev.sriov import functions_of, vf_source_prefix
from pcidev.vmstate import FdRef, VarArray, VarBytes, vmstate
from pcidev.vmstate.errors import StateError

__all__ = ["SRIOV_SECTION", "MAX_VFS", "VfState", "SriovState", "has_virtual_functions", "save_vfs",
           "check_vfs", "load_vfs", "SaveStream", "LoadStream"]

#: Section name of the virtual functions' state (instance 0)
SRIOV_SECTION = "pcidev/sriov"
#: the most VFs a stream carries
MAX_VFS = 4096
_MAX_FDS = 4096


@vmstate("pcidev/sriov-vf")
@attrs.frozen
class VfState:
    """One VF: its saved device stream and the descriptors it names (its FdRef ``i`` is ``fds[i]``)."""

    stream: VarBytes[0xFFFF_FFFF]
    fds: VarArray[FdRef, _MAX_FDS]


@vmstate(SRIOV_SECTION)
@attrs.frozen
class SriovState:
    """The live VFs of a PF, VF 0 first (empty while VF Enable is clear)."""

    vfs: VarArray[VfState, MAX_VFS]


def has_virtual_functions(dev: PciDevice) -> bool:
    """Whether ``dev`` is a PF whose streams carry the ``pcidev/sriov`` section."""
    return functions_of(dev) is not None


#: saves one device: :func:`pcidev.migration.save_device_stream`
SaveStream = Callable[[PciDevice], tuple[bytes, list[int]]]
#: loads one device: :func:`pcidev.migration.load_device_stream`
LoadStream = Callable[[PciDevice, bytes, Sequence[int | None] | None], LoadedResources]


def save_vfs(dev: PciDevice, save_stream: SaveStream) -> SriovState:
    """Save every live VF of ``dev`` (quiesced with it); their descriptors join the PF's.

    :param dev: the PF, during a save (its VFs' descriptors join the stream's through
        :meth:`~pcidev.device.PciDevice.vmstate_fd`) or not (a rollback copy: none).
    :param save_stream: saves one VF.
    """
    functions = functions_of(dev)
    entries = []
    for vf in functions.vfs if functions is not None else ():
        vf.quiesce()
        stream, fds = save_stream(vf)
        refs = [dev.vmstate_fd(fd) for fd in fds]
        entries.append(VfState(stream=stream, fds=tuple(r for r in refs if r is not None)))
    state = SriovState(vfs=tuple(entries))
    if functions is not None and dev.vmstate_save_fds is None:
        # a rollback copy: its streams name descriptors it does not carry, so putting it
        # back means keeping these very VFs (load_vfs leaves them live when it fails)
        functions.kept = (state, tuple(functions.vfs))
    return state


def _fail(reason: str, path: str = "vfs") -> StateError:
    return StateError(reason, section=SRIOV_SECTION, instance_id=0, path=path)


def check_vfs(dev: PciDevice, state: SriovState) -> None:
    """Refuse a state with more VFs than the PF's TotalVFs, and VF streams the PF refuses
    (:meth:`~pcidev.device.PciDevice.check_vf_streams`), before anything is applied.

    :raises StateError: naming the field.
    """
    functions = functions_of(dev)
    total = functions.cap.total_vfs if functions is not None else 0
    if len(state.vfs) > total:
        raise _fail(f"{len(state.vfs)} VFs but TotalVFs is {total}")
    dev.check_vf_streams([vf.stream for vf in state.vfs])


def _vf_contents(loaded: ContentDescriptors, entry: VfState, k: int) -> ContentDescriptors:
    """VF ``k``'s descriptor list when only memory contents travelled: each of its
    descriptors whose contents came under one of its names (``"vf<k>/bar2"``, see
    :func:`~pcidev.sriov.vf_source_prefix`) is that staging memfd, named as the VF names
    it (``"bar2"``); every other one None.

    :raises StateError: the contents of another function were sent for one of its descriptors.
    """
    prefix = vf_source_prefix(k)
    fds: list[int | None] = []
    names: dict[int, str] = {}
    allocated: dict[int, bytes] = {}
    for j, ref in enumerate(entry.fds):
        name = loaded.names.get(ref.index)
        fd = loaded[ref.index] if 0 <= ref.index < len(loaded) else None
        if name is not None and not name.startswith(prefix):
            raise _fail(f"memory contents {name!r} were sent for a descriptor of VF {k}", f"vfs[{k}].fds[{j}]")
        if name is not None:
            names[j] = name[len(prefix):]
            if ref.index in loaded.allocated:
                allocated[j] = loaded.allocated[ref.index]
        fds.append(fd if name is not None else None)
    return ContentDescriptors(fds, names, allocated)


def load_vfs(dev: PciDevice, state: SriovState, load_stream: LoadStream) -> None:
    """Build the PF's VFs and load each one's stream (after the PF's own sections).

    The VFs are not started: the PF's :meth:`~pcidev.device.PciDevice.resume` starts them.

    :param dev: the PF (quiesced, its configuration space loaded).
    :param state: the checked state.
    :param load_stream: loads one VF.
    :raises StateError: the VF count differs from the loaded VF Enable/NumVFs, or a VF
        refused its stream (the VFs built are closed again, the live ones stay).
    """
    functions = functions_of(dev)
    if functions is None:
        raise _fail("the device has no SR-IOV capability")
    kept = functions.kept
    if kept is not None and kept[0] is state:  # the rollback of a failed load
        functions.kept = None
        if tuple(functions.vfs) == kept[1]:
            return  # the VFs it describes are still live
    cap = functions.cap
    want = cap.num_vfs if cap.vf_enable else 0
    if len(state.vfs) != want:
        raise _fail(f"{len(state.vfs)} VFs saved but VF Enable/NumVFs say {want}")
    loaded = dev.vmstate_load_fds
    try:
        vfs = functions.make(len(state.vfs))  # aside: the live VFs stay until every stream loaded
    except ConfigError as exc:
        raise _fail(f"cannot build the VFs: {exc}") from exc
    try:
        for k, (vf, entry) in enumerate(zip(vfs, state.vfs, strict=True)):
            fds: list[int | None] | None = None
            if isinstance(loaded, ContentDescriptors):  # contents travelled: the VF's own, by name
                fds = _vf_contents(loaded, entry, k)
            elif loaded is not None:
                fds = []
                for ref in entry.fds:
                    fd = dev.vmstate_load_fd(ref)
                    if fd is None:
                        raise _fail(f"fd index {ref.index} but only {len(loaded)} fds arrived", f"vfs[{k}].fds")
                    fds.append(fd)
            vf.quiesce()
            res = load_stream(vf, entry.stream, fds)
            vf.add_release(res.close)
    except BaseException:
        functions.discard(vfs)
        raise
    functions.kept = None
    functions.install(vfs)
