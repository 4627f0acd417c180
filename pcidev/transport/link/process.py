r"""Run one device in its own process, served over the device link.

::

    python -m pcidev.transport.link.process --device edu --link unix:/run/edu.sock \
        [-p no:NAME | -p MODULE]... [--set engine=true --set delay=0.0002] \
        [--incoming unix:/run/edu-mig.sock] [--io-timeout 5] [--events]

Without ``--incoming`` the device starts fresh and is served on ``--link``. With
``--incoming`` the process first waits for one migration on that address (a
source's :meth:`~pcidev.transport.endpoint.DeviceEndpoint.migrate_to`), loads the
device, and then serves it on ``--link`` (which it tells the source, so the host
can follow). The process exits when its device has migrated away (status 0), when
an incoming migration fails or the host abandons the device it loaded because its
source took it back (status 1), or on SIGTERM/SIGINT. On every one of
these paths it closes the device once (:meth:`pcidev.device.PciDevice.close`:
workers joined, ``on_close``); a device that migrated away, or a destination's
that never received one, is closed without
:attr:`~pcidev.device.PciDevice.owns_state`, so it persists nothing over the
state the process running the device owns.

``-p no:NAME`` / ``-p MODULE`` select the plugins as the ``pcidev`` command line's
``-p`` does (:func:`pcidev.plugins.parse_plugin_specs`), so a process started on
behalf of ``pcidev -p ...`` sees the same device types.

``--io-timeout S`` is the device-link server's ``io_timeout``
(:class:`~pcidev.transport.link.server.LinkServer`; default
:data:`~pcidev.transport.link.server.DEFAULT_IO_TIMEOUT`, 5 s): a peer must send a
message whole within ``S`` seconds of its first byte, and take a reply within ``S``
seconds, or its connection is dropped (:func:`spawn` and :class:`DeviceProcess` take it
as ``io_timeout``).

``--props TEXT`` gives the device's properties as one ``key=value,...`` string and
``--set NAME=VALUE`` one property at a time (repeatable, added after ``--props``);
the device is built by :meth:`pcidev.registry.DeviceRegistry.create`, so values
follow :mod:`pcidev.properties` (``on``/``off``, ``0x`` hex, ``64M``...). With ``--events`` the process
prints one JSON object per line on standard output: ``ready``, ``incoming``
(with the loaded stream's sections, their subsections and scalar fields), ``migrated`` (the report),
``exit``.

:func:`spawn` starts such a process from Python.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pcidev.errors import PcidevError, PluginSpecError, one_line
from pcidev.plugins import load_registry, make_plugin_manager, parse_plugin_specs
from pcidev.properties import join_properties, split_properties
from pcidev.transport.address import Listener, listen, parse_address
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.server import DEFAULT_IO_TIMEOUT, LinkServer
from pcidev.vmstate import dump_stream_json

__all__ = ["main", "spawn", "property_string", "DeviceProcess", "MIN_IO_TIMEOUT", "MAX_IO_TIMEOUT"]

#: the shortest ``--io-timeout`` (seconds)
MIN_IO_TIMEOUT = 0.001
#: the longest ``--io-timeout`` (seconds): a day
MAX_IO_TIMEOUT = 86400.0


def _io_timeout(text: str) -> float:
    """``--io-timeout``'s value: a finite number of seconds from :data:`MIN_IO_TIMEOUT` to
    :data:`MAX_IO_TIMEOUT` (argparse turns the ValueError into a usage error, status 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not MIN_IO_TIMEOUT <= value <= MAX_IO_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text}: must be from {MIN_IO_TIMEOUT:g} to {MAX_IO_TIMEOUT:g} seconds")
    return value


def property_string(props: str | None, settings: Sequence[str]) -> str:
    """The property string of ``--props TEXT`` followed by the ``--set NAME=VALUE`` items.

    Both are split into pairs and joined again (:func:`pcidev.properties.join_properties`),
    so a trailing comma of ``--props`` (``engine=on,``) cannot swallow the next item.

    :param props: the ``--props`` text, if any.
    :param settings: the ``--set`` items; a comma in a value is kept literal.
    :returns: one ``key=value,...`` string for :meth:`~pcidev.registry.DeviceRegistry.create`.
    :raises PcidevError: a ``--set`` item without ``=`` or with an empty name, or an
        item of ``--props`` with an empty key.
    """
    pairs = split_properties(props) if props else []
    for text in settings:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise PcidevError(f"--set expects NAME=VALUE, got {text!r}")
        pairs.append((name.strip(), value))
    return join_properties(pairs)


def _emit(enabled: bool, event: str, **data: Any) -> None:
    if enabled:
        print(json.dumps({"event": event, "pid": os.getpid(), **data}, default=str), flush=True)


def _summary(stream: bytes) -> list[dict[str, Any]]:
    out = []
    for sec in dump_stream_json(stream)["sections"]:
        scalars = {k: v for k, v in sec["fields"].items() if isinstance(v, (bool, int, str))}
        out.append({"name": sec["name"], "version": sec["version"], "subsections": sorted(sec["subsections"]),
                    "fields": scalars})
    return out


def run(args: argparse.Namespace) -> int:
    """Serve one device as the arguments say (see the module docstring)."""
    blocked, extra = parse_plugin_specs(args.plugin_specs)
    pm = make_plugin_manager(blocked=blocked, plugins=extra)
    registry = load_registry(pm)
    device = registry.create(args.device, property_string(args.props, args.set))
    try:
        endpoint = DeviceEndpoint(device, pm=pm)
    except BaseException:
        device.close()
        raise
    try:
        listener = listen(parse_address(args.link))
    except BaseException:
        endpoint.close()
        raise
    return _serve(args, endpoint, listener)


def _serve(args: argparse.Namespace, endpoint: DeviceEndpoint, listener: Listener) -> int:
    """Serve ``endpoint`` on ``listener``; closes both (and so the device) on every path."""
    link_addr = listener.address
    server = LinkServer(endpoint, listener.sock, io_timeout=args.io_timeout,
                        quiesce_timeout_ms=args.quiesce_timeout_ms)
    serving = False

    def on_signal(signum: int, _frame: Any) -> None:
        if serving:
            server.stop()
        else:  # still waiting for (or receiving) an incoming migration: give up
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.incoming:
            incoming = listen(args.incoming, backlog=1)
            try:  # a signal from here on still removes the socket file
                mlisten, maddr = incoming.sock, incoming.address
                _emit(args.events, "listening", incoming=str(maddr), link=str(link_addr))
                mlisten.settimeout(args.incoming_timeout)
                try:
                    conn, _ = mlisten.accept()
                except TimeoutError as exc:
                    raise PcidevError(f"no source connected to {maddr} within {args.incoming_timeout} s") from exc
            finally:
                incoming.close()
            try:
                result = endpoint.accept_incoming(conn, link=str(link_addr), timeout=args.timeout)
            finally:
                conn.close()
            if args.save_incoming:  # a copy for inspection: failing to write it never stops the device
                try:
                    Path(args.save_incoming).write_bytes(result.stream)
                except OSError as exc:
                    print(f"pcidev link process: cannot write {args.save_incoming}: {exc.strerror or exc}",
                          file=sys.stderr)
            _emit(args.events, "incoming", state_size=len(result.stream), fds=result.fds,
                  loaded_at=result.loaded_at, running_at=result.running_at, state=endpoint.state,
                  sections=_summary(result.stream))
        else:
            endpoint.start()
        _emit(args.events, "ready", link=str(link_addr), state=endpoint.state)
        serving = True
        reason = server.serve_forever()
        if server.migration is not None:
            _emit(args.events, "migrated", **server.migration)
        _emit(args.events, "exit", reason=reason)
        return 1 if reason == "abandoned" else 0
    finally:
        endpoint.close()  # closes the device: workers joined, on_close (see PciDevice.owns_state)
        listener.close()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pcidev.transport.link.process``."""
    ap = argparse.ArgumentParser(prog="python -m pcidev.transport.link.process", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", required=True, help="registered device type (e.g. edu)")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="block the plugin NAME (no:NAME) or load MODULE as an extra plugin; repeatable "
                         "(as pcidev -p)")
    ap.add_argument("--link", required=True, help="address to serve the device link on (unix:PATH)")
    ap.add_argument("--props", metavar="KEY=VALUE,...", help="the device's properties as one string")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="one property of the device; repeatable")
    ap.add_argument("--incoming", help="wait for a migration on this address (unix:PATH or tcp:HOST:PORT)")
    ap.add_argument("--save-incoming", metavar="PATH",
                    help="also write the incoming migration's vmstate stream to PATH (pcidev vmstate dump reads it)")
    ap.add_argument("--incoming-timeout", type=float, default=60.0,
                    help="seconds to wait for the source to connect")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds for each migration step")
    ap.add_argument("--quiesce-timeout-ms", type=float, default=5000.0,
                    help="a migration fails (the device runs on here) if the device does not quiesce "
                         "within this budget (a stuck backend)")
    ap.add_argument("--io-timeout", type=_io_timeout, default=DEFAULT_IO_TIMEOUT, metavar="S",
                    help="seconds a device-link peer may take to send a whole message once it started, and to "
                         f"take a reply, before its connection is dropped (default {DEFAULT_IO_TIMEOUT:g})")
    ap.add_argument("--events", action="store_true", help="print JSON event lines on standard output")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with one line on stderr on an error)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PluginSpecError as exc:
        print(f"pcidev link process: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except PcidevError as exc:
        print(f"pcidev link process: error: {one_line(exc)}", file=sys.stderr)
        return 1


def spawn(device: str, link: str, *, options: str | Mapping[str, Any] | None = None, incoming: str | None = None,
          events: bool = False, stdout: Any = None, stderr: Any = None,
          env: Mapping[str, str] | None = None, plugin_specs: Sequence[str] = (),
          save_incoming: str | None = None, io_timeout: float | None = None) -> subprocess.Popen[str]:
    """Start a device process (``python -m pcidev.transport.link.process``).

    :param device: device type.
    :param link: link address it serves on.
    :param options: the device's properties: a ``key=value,...`` string or a mapping.
    :param incoming: wait for a migration on this address first.
    :param events: print JSON event lines (use ``stdout=subprocess.PIPE`` to read them).
    :param plugin_specs: ``-p`` options for the process (``no:NAME``, ``MODULE``), e.g.
        ``pcidev.cli.CliContext.plugin_specs``, so that it sees the plugins its
        starter sees; a ``MODULE`` must be importable there.
    :param save_incoming: also write the incoming stream to this file.
    :param io_timeout: the link server's ``io_timeout`` (``--io-timeout``; None: its default,
        :data:`~pcidev.transport.link.server.DEFAULT_IO_TIMEOUT`).
    :returns: the process.
    """
    cmd = [sys.executable, "-m", "pcidev.transport.link.process", "--device", device, "--link", link]
    for spec in plugin_specs:
        cmd.append(f"-p={spec}")
    if isinstance(options, str):
        cmd += ["--props", options]
    else:
        for name, value in (options or {}).items():
            text = ("on" if value else "off") if isinstance(value, bool) else str(value)
            cmd += ["--set", f"{name}={text}"]
    if incoming:
        cmd += ["--incoming", incoming]
    if save_incoming:
        cmd += ["--save-incoming", save_incoming]
    if io_timeout is not None:
        cmd += ["--io-timeout", repr(float(io_timeout))]
    if events:
        cmd.append("--events")
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True,
                            env=None if env is None else {**os.environ, **env})


class DeviceProcess:
    """A device process started with :func:`spawn`, whose event lines are collected.

    :param device: device type.
    :param link: link address.
    :param options: the device's properties: a ``key=value,...`` string or a mapping.
    :param incoming: wait for a migration on this address first.
    :param plugin_specs: ``-p`` options for the process (see :func:`spawn`).
    :param save_incoming: also write the incoming stream to this file.
    :param io_timeout: the link server's ``io_timeout`` (see :func:`spawn`).
    """

    def __init__(self, device: str, link: str, *, options: str | Mapping[str, Any] | None = None,
                 incoming: str | None = None, plugin_specs: Sequence[str] = (),
                 save_incoming: str | None = None, io_timeout: float | None = None) -> None:
        self.link = link
        self.incoming = incoming
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = spawn(device, link, options=options, incoming=incoming, events=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, plugin_specs=plugin_specs,
                          save_incoming=save_incoming, io_timeout=io_timeout)
        self._readers = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_events(self) -> None:
        for line in self.proc.stdout or ():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "line": line.rstrip("\n")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "eof"})
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr or ():
            self.stderr_lines.append(line.rstrip("\n"))

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the first event called ``name``.

        :raises PcidevError: the process ended or the timeout passed first (the
            message carries the end of its standard error).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                if any(e.get("event") == "eof" for e in self.events):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        tail = " | ".join(self.stderr_lines[-5:])
        raise PcidevError(f"device process {self.pid} never reported {name!r}"
                          + (f" (stderr: {tail})" if tail else ""))

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate the process (if still running), reap it, collect the rest of its
        output and close the pipes to it; returns its status. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait(timeout)
        for reader in self._readers:  # the pipes end with the process (unless it left children)
            reader.join(timeout)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None and not any(t.is_alive() for t in self._readers):
                pipe.close()
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
