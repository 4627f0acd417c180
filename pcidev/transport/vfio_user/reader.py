"""Reading vfio-user messages from the client socket.

:class:`MessageReader` turns the byte stream of one connection into
:class:`Message` objects: the 16-byte header, the body, and the file descriptors
the client sent with the message. A message whose header cannot be trusted is
returned with its ``error`` set instead of a body, so that the server
answers it with an error reply; its ``fatal`` says the stream cannot be
re-synchronized after it.

The reader is buffered: :meth:`MessageReader.fill` takes whatever the socket
holds with one ``recvmsg`` (up to a 256 KiB buffer), and :meth:`MessageReader.next`
returns the complete messages in it one by one, without a system call. A burst of
posted doorbell writes thus costs one read, not two per message.

**Which message the descriptors belong to.** ``SCM_RIGHTS`` descriptors travel with
the first byte of the ``sendmsg`` that carried them, and Linux ends a stream read
right after a segment that carried descriptors (``unix_stream_read_generic``). A
vfio-user client sends each message with one ``sendmsg`` (QEMU does, and so does
pcidev's client), so the descriptors of one read belong to **the last message whose
header starts in the bytes of that read**. Descriptors that arrive with bytes in
which no message starts (the middle of a message) are a protocol error: the read
raises :class:`~pcidev.errors.TransportError` and the connection ends. A message
that carried more descriptors than ``max_msg_fds`` is returned with its ``error`` set
(``EINVAL``; the descriptors are closed) and the connection goes on. Until the
message owning a read's descriptors is complete, the reader reads no byte past its
end, so it never holds descriptors for more than one message.

:meth:`MessageReader.pending` returns what the reader has taken from the socket
but not yet handed out (whole messages and a partial one, with the descriptors of
the last message that starts in them), so that a connection can move to another
process at a message boundary (the handover) without losing or repeating a byte;
:meth:`MessageReader.prepend` gives them to the new process's reader, which
attributes the descriptors by the same rule.
"""

from __future__ import annotations

import errno
import socket

import attrs

from pcidev.errors import TransportError
from pcidev.transport.fdpass import TooManyFds, close_fds, recv_some
from pcidev.transport.vfio_user import protocol

__all__ = ["BUFFER_SIZE", "Message", "MessageReader", "SLACK"]

#: payload bytes beyond ``max_data_xfer_size`` a message may carry (its own fixed fields)
SLACK = 4096
#: bytes one :meth:`MessageReader.fill` may take from the socket (the buffer grows
#: beyond this only to hold one large message whole)
BUFFER_SIZE = 256 * 1024

_HEADER = protocol.HEADER
_HSIZE = protocol.HEADER_SIZE
#: the fds of a message that carried more than allowed (the kernel or the reader closed
#: them): the message is answered with EINVAL (compared by identity; never filled)
_EXCESS: list[int] = []


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

    :param sock: the client socket (blocking or not: :meth:`fill` never waits unless asked).
    :param max_msg_fds: the most descriptors one message may carry.
    :param max_data_xfer_size: the most data one region access may carry (a larger
        message is refused as fatal).
    :param buffer_size: bytes one read may take.
    """

    def __init__(self, sock: socket.socket, *, max_msg_fds: int, max_data_xfer_size: int,
                 buffer_size: int = BUFFER_SIZE) -> None:
        self.sock = sock
        self.max_msg_fds = max_msg_fds
        self.max_body = max_data_xfer_size + SLACK
        self._chunk = max(buffer_size, _HSIZE)
        self._buf = bytearray(self._chunk)
        self._mv = memoryview(self._buf)
        #: the unread bytes are ``_buf[_start:_end]``
        self._start = 0
        self._end = 0
        #: (buffer index of the message the fds belong to, the fds)
        self._group: tuple[int, list[int]] | None = None
        self._closed_fatal = False

    def fileno(self) -> int:
        """The socket's fd (for ``poll``)."""
        return self.sock.fileno()

    # -- buffer state ------------------------------------------------------------------
    def buffered(self) -> bool:
        """Whether bytes wait in the reader (read from the socket, not yet returned)."""
        return self._end > self._start

    def has_message(self) -> bool:
        """Whether :meth:`next` would return a message without reading the socket."""
        avail = self._end - self._start
        if avail < _HSIZE:
            return False
        size: int = _HEADER.unpack_from(self._buf, self._start)[2]
        return size < _HSIZE or size - _HSIZE > self.max_body or size <= avail

    def pending(self) -> tuple[bytes, list[int]]:
        """Take the bytes and fds read from the socket but not yet returned as a message.

        The bytes start at a message boundary (whole messages, then possibly the
        start of one); the fds belong to the last message that starts in them. The
        caller owns the fds. The reader is empty afterwards.
        """
        data = self._mv[self._start:self._end].tobytes()
        fds = list(self._group[1]) if self._group is not None else []
        self._start = self._end = 0
        self._group = None
        return data, fds

    def prepend(self, data: bytes, fds: list[int]) -> None:
        """Put ``data`` in front of the socket's stream: what another process's reader
        returned from :meth:`pending` (it starts at a message boundary). ``fds`` belong
        to the last message whose header starts in ``data``. Takes the fds.

        :raises TransportError: fds but no message starts in ``data``, or this reader
            already holds fds (the fds are closed).
        """
        if not data and not fds:
            return
        if fds and (not data or self._group is not None):
            close_fds(fds)
            raise TransportError("vfio-user: file descriptors without a message to carry them")
        old_start = self._start
        rest = self._mv[old_start:self._end].tobytes()
        group = self._group
        self._set_buffer(bytes(data) + rest, max(self._chunk, len(data) + len(rest)))
        if group is not None:
            self._group = (group[0] - old_start + len(data), group[1])
        if fds:
            owner = self._last_start(0, len(data))
            if owner is None:  # pragma: no cover - data is not empty, so a message starts at 0
                close_fds(fds)
                raise TransportError("vfio-user: file descriptors without a message to carry them")
            self._group = (owner, list(fds))

    def close(self) -> None:
        """Close the fds held for a message not yet returned (the socket stays open)."""
        if self._group is not None:
            close_fds(self._group[1])
            self._group = None
        self._start = self._end = 0

    # -- parsing -------------------------------------------------------------------------
    def next(self) -> Message | None:
        """The next complete message in the buffer, or None (no system call).

        A header that cannot be trusted gives a message with ``error`` set (``fatal``
        when its size exceeds the maximum: the reader then holds nothing more).
        """
        start = self._start
        avail = self._end - start
        if avail < _HSIZE:
            return None
        mid, cmd, size, flags, _err = _HEADER.unpack_from(self._buf, start)
        if _HSIZE <= size <= avail:
            if size - _HSIZE > self.max_body:
                return self._refuse(mid, cmd, flags, size)
            stop = start + size
            body = self._mv[start + _HSIZE:stop].tobytes() if size > _HSIZE else b""
            if stop == self._end:
                self._start = self._end = 0
            else:
                self._start = stop
            group = self._group
            if group is not None and group[0] == start:
                self._group = None
                if group[1] is _EXCESS:
                    return Message(mid, cmd, flags, error=(
                        errno.EINVAL, f"more than the {self.max_msg_fds} file descriptors one message may carry"))
                return Message(mid, cmd, flags, body, group[1])
            return Message(mid, cmd, flags, body, [])
        if size < _HSIZE:  # where the next message starts is unknowable: the stream is lost
            self.close()
            self._closed_fatal = True
            return Message(mid, cmd, flags, error=(errno.EINVAL, f"message size {size} is smaller than its header"),
                           fatal=True)
        if size - _HSIZE > self.max_body:
            return self._refuse(mid, cmd, flags, size)
        return None  # incomplete

    def _refuse(self, mid: int, cmd: int, flags: int, size: int) -> Message:
        """An oversized message: the stream is lost; drop everything buffered (as for a
        size below the header's)."""
        self.close()
        self._closed_fatal = True
        return Message(mid, cmd, flags, error=(errno.E2BIG, f"message size {size} exceeds the maximum"), fatal=True)

    def _drop_group(self, start: int) -> None:
        group = self._group
        if group is not None and group[0] == start:
            close_fds(group[1])
            self._group = None

    def _last_start(self, lo: int, hi: int) -> int | None:
        """Buffer index of the last message start in ``[lo, hi)`` (starts follow from the
        sizes in the headers from ``_start`` on), or None."""
        pos, end, last = self._start, self._end, None
        buf = self._buf
        while pos < hi:
            if pos >= lo:
                last = pos
            if pos + _HSIZE > end:
                break
            size = _HEADER.unpack_from(buf, pos)[2]
            if size - _HSIZE > self.max_body:
                break  # fatal: no message follows
            pos += max(size, _HSIZE)
        return last

    def _missing(self, pos: int) -> int:
        """Bytes still missing to complete the message that starts at ``pos``."""
        have = self._end - pos
        if have < _HSIZE:
            return _HSIZE - have
        size: int = _HEADER.unpack_from(self._buf, pos)[2]
        if size - _HSIZE > self.max_body:
            return 0
        return max(size, _HSIZE) - have

    def _set_buffer(self, data: bytes, capacity: int) -> None:
        buf = bytearray(capacity)
        buf[:len(data)] = data
        self._mv.release()
        self._buf, self._mv = buf, memoryview(buf)
        self._start, self._end = 0, len(data)

    def _room(self, want: int) -> None:
        """Make ``want`` bytes of space after ``_end`` (moving or growing the buffer)."""
        start = self._start
        if start:
            n = self._end - start
            self._buf[:n] = self._mv[start:self._end]
            self._start, self._end = 0, n
            if self._group is not None:
                self._group = (self._group[0] - start, self._group[1])
        if len(self._buf) - self._end < want:
            self._set_buffer(self._mv[:self._end].tobytes(), self._end + want)

    # -- reading the socket ----------------------------------------------------------------
    def fill(self, *, block: bool = False) -> int:
        """One read of what the socket holds into the buffer.

        :param block: wait until something arrives (otherwise ``MSG_DONTWAIT``).
        :returns: bytes read; 0 when the client closed the connection; -1 when nothing
            was waiting (non-blocking) or nothing may be read yet.
        :raises TransportError: the socket failed, too many fds, or fds that no
            message can own (then the connection cannot go on).
        """
        if self._closed_fatal:
            return -1
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        group = self._group
        if group is not None:
            need = self._missing(group[0])  # only the rest of the message that owns the fds
            if need <= 0:
                return -1
        else:
            need = max(self._missing(start), 1) if end > start else 1
        if len(self._buf) - end < max(need, self._chunk >> 2):
            self._room(need)
            end = self._end
        want = need if group is not None else len(self._buf) - end
        try:
            n, fds = recv_some(self.sock, self._mv[end:end + want], max_fds=self.max_msg_fds, block=block)
        except TooManyFds as exc:  # closed already; the message they came with is refused
            owner = None if group is not None else self._last_start(end, end + exc.nbytes)
            if owner is None:
                raise
            self._end = end + exc.nbytes
            self._group = (owner, _EXCESS)
            return exc.nbytes
        if n <= 0:
            close_fds(fds)
            return n
        self._end = end + n
        if fds:
            owner = None if group is not None else self._last_start(end, end + n)
            if owner is None:
                close_fds(fds)
                raise TransportError("vfio-user: file descriptors arrived in the middle of a message")
            self._group = (owner, fds)
        return n

    def read(self) -> Message | None:
        """Read the next message (blocks until it is complete).

        :returns: the message, or None when the client closed between messages.
        :raises TransportError: the client closed mid-message or broke the framing.
        """
        while True:
            msg = self.next()
            if msg is not None:
                return msg
            n = self.fill(block=True)
            if n == 0:
                if self.buffered():
                    raise TransportError(
                        f"peer closed the connection ({self._end - self._start} bytes of a message read)")
                return None
            if n < 0 and self._closed_fatal:
                return None
