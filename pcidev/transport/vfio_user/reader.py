"""Reading vfio-user messages from the client socket.

:class:`MessageReader` turns the byte stream of one connection into
:class:`Message` objects: the 16-byte header, the body, and the file descriptors
the client sent with the message (``SCM_RIGHTS`` travel with the header, see
``pcidev.transport.fdpass``). A message whose header cannot be trusted is
returned with its ``error`` set instead of a body, so that the server
answers it with an error reply; its ``fatal`` says the stream cannot be
re-synchronized after it.

:meth:`MessageReader.pending` returns what the reader has taken from the socket
but not yet handed out, so that a connection can move to another process at a
message boundary (the handover) without losing or repeating a byte.
"""

from __future__ import annotations

import errno
import socket

import attrs

from pcidev.transport.fdpass import close_fds, recv_exact
from pcidev.transport.vfio_user import protocol

__all__ = ["Message", "MessageReader", "SLACK"]

#: payload bytes beyond ``max_data_xfer_size`` a message may carry (its own fixed fields)
SLACK = 4096


@attrs.define(slots=True)
class Message:
    """One message read from the client.

    :param mid: the message id.
    :param cmd: the command code.
    :param flags: the header's flags (type, NO_REPLY, ERROR).
    :param body: the payload after the header.
    :param fds: descriptors received with it (the receiver owns them).
    :param error: ``(errno, text)`` when the header was refused; the body was not read.
    :param fatal: the stream cannot continue after this message (its size is untrusted).
    """

    mid: int
    cmd: int
    flags: int
    body: bytes = b""
    fds: list[int] = attrs.Factory(list)
    error: tuple[int, str] | None = None
    fatal: bool = False


class MessageReader:
    """Reads whole messages from one connected ``AF_UNIX`` stream socket.

    :param sock: the client socket (blocking).
    :param max_msg_fds: the most descriptors one message may carry.
    :param max_data_xfer_size: the most data one region access may carry (a larger
        message is refused as fatal).
    """

    def __init__(self, sock: socket.socket, *, max_msg_fds: int, max_data_xfer_size: int) -> None:
        self.sock = sock
        self.max_msg_fds = max_msg_fds
        self.max_body = max_data_xfer_size + SLACK
        self._prefix = bytearray()
        self._prefix_fds: list[int] = []

    def fileno(self) -> int:
        """The socket's fd (for ``poll``)."""
        return self.sock.fileno()

    def buffered(self) -> bool:
        """Whether bytes wait in the reader (a message can start without the socket being readable)."""
        return bool(self._prefix)

    def pending(self) -> tuple[bytes, list[int]]:
        """Take the bytes and fds read from the socket but not yet returned as a message.

        They belong to the messages after the last one :meth:`read` returned; the
        caller owns the fds. The reader is empty afterwards.
        """
        data, fds = bytes(self._prefix), self._prefix_fds
        self._prefix = bytearray()
        self._prefix_fds = []
        return data, fds

    def prepend(self, data: bytes, fds: list[int]) -> None:
        """Put ``data`` (and the fds sent with its first message) in front of the socket's
        stream: what another process's reader returned from :meth:`pending`. Takes the fds."""
        self._prefix[:0] = data
        self._prefix_fds[:0] = fds

    def _take(self, n: int, *, max_fds: int, eof_ok: bool = False) -> tuple[bytes, list[int]]:
        """``n`` bytes, from the prefix first, then the socket."""
        if not self._prefix:
            return recv_exact(self.sock, n, max_fds=max_fds, eof_ok=eof_ok)
        head = bytes(self._prefix[:n])
        del self._prefix[:n]
        fds, self._prefix_fds = self._prefix_fds, []
        if len(head) < n:
            try:
                rest, more = recv_exact(self.sock, n - len(head), max_fds=max(0, max_fds - len(fds)))
            except BaseException:
                close_fds(fds)
                raise
            head += rest
            fds += more
        return head, fds

    def read(self) -> Message | None:
        """Read the next message (blocks until it is complete).

        :returns: the message, or None when the client closed between messages.
        :raises TransportError: the client closed mid-message or broke the framing.
        """
        raw, fds = self._take(protocol.HEADER_SIZE, max_fds=self.max_msg_fds, eof_ok=True)
        if not raw:
            return None
        mid, cmd, size, flags, _err = protocol.HEADER.unpack(raw)
        if size < protocol.HEADER_SIZE:
            close_fds(fds)
            return Message(mid, cmd, flags, error=(errno.EINVAL, f"message size {size} is smaller than its header"))
        if size - protocol.HEADER_SIZE > self.max_body:
            close_fds(fds)
            return Message(mid, cmd, flags, error=(errno.E2BIG, f"message size {size} exceeds the maximum"),
                           fatal=True)
        body = b""
        if size > protocol.HEADER_SIZE:
            try:
                body, extra = self._take(size - protocol.HEADER_SIZE, max_fds=0)
                fds += extra
            except BaseException:
                close_fds(fds)
                raise
        return Message(mid, cmd, flags, body, fds)
