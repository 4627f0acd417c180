"""The state of one vfio-user connection, apart from the device's own state.

What a client set up on a connection (its capabilities, DMA ranges given
without a file descriptor, which interrupt vectors have an eventfd, the INTx
mask, message counts) belongs to the connection, not to the device: when the
client leaves, it goes; when the connection moves to another process (the
handover), it travels as :meth:`ConnectionState.to_meta` next to the device's
vmstate stream, which carries the DMA region fds and eventfds themselves.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterator
from typing import Any

import attrs

from pcidev.errors import StateError
from pcidev.transport.vfio_user import protocol

__all__ = ["ConnectionState", "NofdMaps"]


class NofdMaps:
    """The DMA ranges a client gave without a file descriptor: address -> ``(size, flags)``.

    A mapping kept sorted by address, so that :meth:`overlapping` is a ``bisect``
    (``O(log n)``) rather than a scan of every earlier map. The ranges never overlap
    (the server refuses an overlapping ``DMA_MAP``).
    """

    def __init__(self, items: dict[int, tuple[int, int]] | None = None) -> None:
        self._maps: dict[int, tuple[int, int]] = {}
        self._starts: list[int] = []
        for addr, value in (items or {}).items():
            self[addr] = value

    def __setitem__(self, addr: int, value: tuple[int, int]) -> None:
        if addr not in self._maps:
            insort(self._starts, addr)
        self._maps[addr] = value

    def __getitem__(self, addr: int) -> tuple[int, int]:
        return self._maps[addr]

    def __delitem__(self, addr: int) -> None:
        del self._maps[addr]
        i = bisect_right(self._starts, addr) - 1
        del self._starts[i]

    def __contains__(self, addr: object) -> bool:
        return addr in self._maps

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[int]:
        return iter(self._starts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NofdMaps):
            return self._maps == other._maps
        return self._maps == other

    def __repr__(self) -> str:
        return f"NofdMaps({self._maps!r})"

    def items(self) -> list[tuple[int, tuple[int, int]]]:
        """``(address, (size, flags))`` pairs, sorted by address."""
        return [(a, self._maps[a]) for a in self._starts]

    def clear(self) -> None:
        """Forget every range."""
        self._maps.clear()
        self._starts.clear()

    def overlapping(self, addr: int, size: int) -> int | None:
        """The address of a range that shares a byte with ``[addr, addr + size)``, or None."""
        starts = self._starts
        i = bisect_right(starts, addr)
        if i > 0:
            a = starts[i - 1]
            if a + self._maps[a][0] > addr:
                return a
        if i < len(starts) and starts[i] < addr + size:
            return starts[i]
        return None


def _irq_sets() -> dict[int, set[int]]:
    return {i: set() for i in range(protocol.NUM_IRQS)}


@attrs.define
class ConnectionState:
    """Per-connection state of a :class:`~pcidev.transport.vfio_user.server.VfioUserServer`.

    :param max_msg_fds: the most fds accepted with one message (advertised in VERSION).
    :param max_data_xfer_size: the most data in one region access (advertised).
    """

    max_msg_fds: int = 8
    max_data_xfer_size: int = 1 << 20
    #: what the client said in VERSION (None before)
    client_caps: dict[str, Any] | None = None
    #: DMA ranges the client gave without an fd: address -> (size, flags)
    nofd_maps: NofdMaps = attrs.Factory(NofdMaps)
    #: vectors of each IRQ index that have an eventfd
    irq_vectors: dict[int, set[int]] = attrs.Factory(_irq_sets)
    #: INTx masked by the client (SET_IRQS MASK)
    intx_masked: bool = False
    #: messages handled, by command name
    counts: dict[str, int] = attrs.Factory(dict)
    #: the vfio-user migration state of the device behind this connection
    #: (``VFIO_DEVICE_STATE_*``: 2 is RUNNING, the state outside a migration)
    mig_state: int = 2

    def to_meta(self) -> dict[str, Any]:
        """A msgpack-able dict of this state (for the handover)."""
        return {
            "max_msg_fds": self.max_msg_fds, "max_data_xfer_size": self.max_data_xfer_size,
            "client_caps": self.client_caps,
            "nofd_maps": [[a, s, f] for a, (s, f) in sorted(self.nofd_maps.items())],
            "irq_vectors": {str(i): sorted(v) for i, v in self.irq_vectors.items()},
            "intx_masked": self.intx_masked, "counts": dict(self.counts), "mig_state": self.mig_state,
        }

    @classmethod
    def from_meta(cls, meta: Any) -> ConnectionState:
        """The state :meth:`to_meta` described.

        :raises StateError: ``meta`` is not such a description (one line saying what is wrong).
        """
        try:
            if not isinstance(meta, dict):
                raise TypeError("not a map")
            caps = meta["client_caps"]
            if caps is not None and not isinstance(caps, dict):
                raise TypeError("client_caps is not a map")
            state = cls(max_msg_fds=int(meta["max_msg_fds"]), max_data_xfer_size=int(meta["max_data_xfer_size"]),
                        client_caps=caps, intx_masked=bool(meta["intx_masked"]),
                        mig_state=int(meta["mig_state"]))
            for a, s, f in meta["nofd_maps"]:
                state.nofd_maps[int(a)] = (int(s), int(f))
            for key, vectors in dict(meta["irq_vectors"]).items():
                index = int(key)
                if index not in state.irq_vectors:
                    raise ValueError(f"no IRQ index {index}")
                state.irq_vectors[index] = {int(v) for v in vectors}
            state.counts = {str(k): int(v) for k, v in dict(meta["counts"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"vfio-user connection state: {type(exc).__name__}: {exc}") from exc
        return state
