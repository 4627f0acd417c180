"""A raw device-link connection for the link tests: requests and replies by hand."""

from __future__ import annotations

import socket
from typing import Any

from pcidev.transport.link.protocol import (
    FLAG_ERROR,
    decode_body,
    encode_body,
    error_from_reply,
    read_message,
    send_message,
)


class Raw:
    """A raw link connection: requests sent without waiting (:meth:`send`), replies read
    one by one (:meth:`reply`), or both at once (:meth:`request`)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address.removeprefix("unix:"))
        self.mid = 0

    def send(self, kind: int, body: Any) -> int:
        """Send a request; returns its message id."""
        self.mid += 1
        send_message(self.sock, kind, 0, self.mid, encode_body(body))
        return self.mid

    def reply(self, timeout: float = 30.0) -> tuple[int, int, Any]:
        """``(kind, id, value)``; the value is the typed error of an error reply."""
        self.sock.settimeout(timeout)
        kind, flags, mid, body, _fds = read_message(self.sock, max_fds=0)
        return kind, mid, error_from_reply(body) if flags & FLAG_ERROR else decode_body(body, "reply")

    def request(self, kind: int, body: Any, timeout: float = 30.0) -> Any:
        """The reply's value, or the typed error of an error reply (the reply must answer
        this request)."""
        mid = self.send(kind, body)
        rkind, rid, value = self.reply(timeout)
        assert (rkind, rid) == (kind, mid)
        return value

    def close(self) -> None:
        self.sock.close()
