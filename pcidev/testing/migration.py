"""Migrate a device between processes N times while a workload keeps running on it.

:func:`migrate_under_load` is the orchestration ``pcidev demo`` and the migration
examples use, for any registered device type:

1. the device starts in its own process (a device-link process,
   :class:`~pcidev.transport.link.process.DeviceProcess`), with the properties and
   plugin selection given; the destination of each migration starts once the one
   before has completed (the first once the source is ready), while the workload
   runs, and waits for its incoming migration;
2. a software host (:class:`~pcidev.host.Machine`) plugs the device
   (:meth:`~pcidev.host.Machine.plug_remote`) and, unless ``probe=False``, enables
   it as a driver's probe does;
3. the caller's :class:`Workload` runs on a host thread, one :meth:`Workload.step`
   after the other, each checking its own results (it raises on a mismatch);
4. every ``every`` iterations the device moves to the next process
   (:meth:`~pcidev.transport.link.RemoteDevice.migrate`; the host holds its
   accesses meanwhile and follows the device);
5. after the last migration the workload runs ``every`` more iterations (or to its
   own end), is stopped between two steps, and :meth:`Workload.verify` runs once.

On every path -- success, a workload failure, a refused migration, a
``KeyboardInterrupt`` -- the workload is stopped, the host's proxy closed, every
device process terminated and reaped and every socket file removed (they live in
a private directory that is deleted). Errors reach the caller typed:

* the workload's exception as the cause of a :class:`WorkloadError`, which says
  at which iteration and after how many migrations it failed;
* a refused or failed migration as the :class:`~pcidev.errors.MigrationError`
  (:class:`~pcidev.errors.MigrationBlockedError` for blockers) the source
  raised, the destination's reason in its message, with a note naming the
  migration;
* a device process that cannot start as the :class:`~pcidev.errors.PcidevError`
  carrying its standard error's last line.

::

    result = migrate_under_load("edu", EduWorkload(), count=5)
    print(result)   # per-migration downtime, state size, iterations
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from pcidev.errors import PcidevError
from pcidev.host.machine import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.testing.harness import probe as probe_device
from pcidev.transport.link.process import DeviceProcess
from pcidev.transport.link.remote import RemoteDevice

__all__ = ["Workload", "WorkloadContext", "WorkloadError", "MigrationRecord", "MigrationRunResult",
           "migrate_under_load", "TRANSPORTS"]

#: the transports a migration may use: ``unix`` (descriptors travel with the
#: state) and ``tcp`` (localhost; no descriptors, the host re-attaches RAM and
#: eventfds at the destination)
TRANSPORTS = ("unix", "tcp")


class WorkloadError(PcidevError):
    """The workload raised (its exception is the ``__cause__``); the run was stopped.

    :param message: what failed, with the iteration and the migrations done.
    :param iteration: the iteration that raised (0 for :meth:`Workload.setup`).
    :param migrations: migrations completed before it.
    :param result: the run so far.
    """

    def __init__(self, message: str, *, iteration: int, migrations: int,
                 result: MigrationRunResult | None = None) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.migrations = migrations
        self.result = result


@attrs.define(eq=False)
class WorkloadContext:
    """What a workload works with: the host, the plugged device and the run's progress.

    :ivar machine: the software host.
    :ivar pdev: the host's handle on the device (its ``device`` is the
        :class:`~pcidev.transport.link.RemoteDevice` that follows the migrations).
    :ivar stopping: set when the runner wants the workload to stop; a long
        :meth:`Workload.step` may check it.
    :ivar iteration: steps completed so far.
    :ivar migrations: migrations completed so far.
    :ivar ended: set once the workload ended (finished, failed or stopped): a
        :meth:`Workload.before_migration` waiting for it to reach a state gives up.
    """

    machine: Machine
    pdev: HostPciDevice
    stopping: threading.Event = attrs.field(factory=threading.Event)
    ended: threading.Event = attrs.field(factory=threading.Event)
    iteration: int = 0
    migrations: int = 0

    @property
    def pid(self) -> int | None:
        """The process serving the device now."""
        device = self.pdev.device
        pid = device.info.get("pid") if isinstance(device, RemoteDevice) else None
        return pid if isinstance(pid, int) else None

    @property
    def link(self) -> str | None:
        """The device-link address of the process serving the device now."""
        device = self.pdev.device
        return device.address if isinstance(device, RemoteDevice) else None


class Workload:
    """A workload that keeps the device busy and checks its own results.

    Subclass it and override :meth:`step` (and :meth:`setup`, :meth:`verify` if
    needed), or pass a plain function ``step(ctx)`` to :func:`migrate_under_load`.
    Every method runs on the runner's workload thread, :meth:`verify` on the
    caller's. Raise (anything) on a verification failure: the runner stops and
    raises :class:`WorkloadError` from it.

    A device type's *standard* workload (:func:`pcidev.testing.standard_workload`,
    provided by its plugin) also says which device configuration it needs
    (:attr:`properties`, :attr:`probe`, :attr:`ram_size`: :func:`migrate_under_load`
    uses them when its caller gives none), may prepare the device's state for a
    migration (:meth:`before_migration`, :meth:`after_migration`: a full completion
    queue at the stop, for example) and counts what it checked (:meth:`report`).
    """

    #: the device properties the workload needs (``key=value,...``)
    properties: str = ""
    #: whether the runner enables the device before :meth:`setup` (False: the
    #: workload's driver probes it itself)
    probe: bool = True
    #: bytes of guest RAM the workload needs
    ram_size: int = 64 << 20

    def setup(self, ctx: WorkloadContext) -> None:
        """Prepare (buffers in guest RAM, queues, rings) before the first step.

        :param ctx: the host and the device.
        """

    def step(self, ctx: WorkloadContext) -> bool | None:
        """One iteration: drive the device and check what it did.

        :param ctx: the host and the device.
        :returns: False when the workload has nothing more to do (it then ends;
            migrations still due run on the idle device); anything else to go on.
        """
        raise NotImplementedError

    def verify(self, ctx: WorkloadContext) -> None:
        """The final check, after the workload stopped and every migration ran.

        :param ctx: the host and the device.
        """

    def before_migration(self, ctx: WorkloadContext, index: int) -> None:
        """Called on the runner's thread just before migration ``index`` starts, while
        the workload runs. It may wait (briefly: it delays the migration) until the
        workload brought the device into a state worth migrating. The default does nothing.

        :param ctx: the host and the device.
        :param index: 1 for the first migration.
        """

    def after_migration(self, ctx: WorkloadContext, record: MigrationRecord | None) -> None:
        """Called on the runner's thread after each migration that
        :meth:`before_migration` preceded, on every path: ``record`` is None when the
        migration failed. The default does nothing.

        :param ctx: the host and the device.
        :param record: the migration, or None.
        """

    def report(self) -> dict[str, Any]:
        """What the workload did and found, JSON-ready; a standard workload reports at
        least ``mismatches``, ``lost_completions`` and ``duplicate_completions`` (None
        for what the device gives no way to observe). The default: nothing.

        :returns: figures by name.
        """
        return {}


class _StepFunction(Workload):
    """A plain ``step(ctx)`` function as a :class:`Workload`."""

    def __init__(self, fn: Callable[[WorkloadContext], bool | None]) -> None:
        self.fn = fn

    def step(self, ctx: WorkloadContext) -> bool | None:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"<workload {getattr(self.fn, '__name__', self.fn)!r}>"


@attrs.frozen
class MigrationRecord:
    """One migration of a run.

    :ivar index: 1 for the first migration.
    :ivar source_pid: the process the device left.
    :ivar destination_pid: the process it runs in now.
    :ivar iteration: workload iterations completed when the migration started.
    :ivar state_size: bytes of the vmstate stream.
    :ivar fds: file descriptors passed with it (0 over TCP).
    :ivar downtime: seconds from the stop on the source to running on the
        destination (None when the clocks are not comparable).
    :ivar downtime_upper_bound: seconds from the stop to the destination's
        acknowledgement, on the source's clock.
    :ivar host_pause: seconds the host's accesses were held.
    :ivar sections: the loaded stream's sections as the destination reported them
        (name, version, subsections, scalar fields).
    :ivar report: the full report of :meth:`~pcidev.transport.link.RemoteDevice.migrate`.
    :ivar stream: the vmstate stream the destination loaded, for the migration
        :func:`migrate_under_load` was asked to keep (``keep_stream``); else None.
    """

    index: int
    source_pid: int
    destination_pid: int
    iteration: int
    state_size: int
    fds: int
    downtime: float | None
    downtime_upper_bound: float
    host_pause: float
    sections: tuple[dict[str, Any], ...] = ()
    report: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    stream: bytes | None = attrs.field(default=None, repr=False)

    @property
    def summary(self) -> Mapping[str, Any]:
        """What the device's plugins said of its state at the stop
        (:func:`~pcidev.hookspecs.pcidev_migration_summary`; NVMe: ``cqs_full``,
        ``cq_backlog``, ``sq_unfetched``, ``aers_outstanding``); empty if none did."""
        summary = self.report.get("summary")
        return summary if isinstance(summary, Mapping) else {}

    def __str__(self) -> str:
        down = f"{self.downtime * 1e3:.2f} ms" if self.downtime is not None else \
            f"<= {self.downtime_upper_bound * 1e3:.2f} ms"
        return (f"migration {self.index}: process {self.source_pid} -> {self.destination_pid} at iteration "
                f"{self.iteration}: downtime {down}, host accesses held {self.host_pause * 1e3:.2f} ms, "
                f"state {self.state_size} bytes + {self.fds} fds")


@attrs.frozen
class MigrationRunResult:
    """What :func:`migrate_under_load` reports (also carried by a :class:`WorkloadError`).

    :ivar device_type: the device type.
    :ivar transport: ``unix`` or ``tcp``.
    :ivar migrations: the migrations done, in order.
    :ivar iterations: workload steps completed.
    :ivar errors: the workload's failures (empty after a successful run).
    :ivar seconds: from the workload's first step to its stop.
    :ivar pids: every device process the run started.
    """

    device_type: str
    transport: str
    migrations: tuple[MigrationRecord, ...]
    iterations: int
    errors: tuple[str, ...]
    seconds: float
    pids: tuple[int, ...] = ()

    @property
    def downtimes(self) -> list[float]:
        """The downtimes (seconds) that were measured."""
        return [m.downtime for m in self.migrations if m.downtime is not None]

    @property
    def max_downtime(self) -> float | None:
        """The longest measured downtime (seconds), None if none was."""
        return max(self.downtimes, default=None)

    def __str__(self) -> str:
        lines = [f"{self.device_type}: {len(self.migrations)} migrations over {self.transport} in "
                 f"{self.seconds:.2f} s; workload: {self.iterations} iterations, {len(self.errors)} errors"]
        lines += [f"  {m}" for m in self.migrations]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)

    def __repr__(self) -> str:
        worst = self.max_downtime
        down = f", max downtime {worst * 1e3:.2f} ms" if worst is not None else ""
        return (f"<MigrationRunResult {self.device_type} x{len(self.migrations)} over {self.transport}{down}, "
                f"{self.iterations} iterations, {len(self.errors)} errors>")


class _WorkloadThread(threading.Thread):
    """Runs :meth:`Workload.setup`, then steps until stopped, finished or failed."""

    def __init__(self, workload: Workload, ctx: WorkloadContext, limit: int | None) -> None:
        super().__init__(name="pcidev-workload", daemon=True)
        self.workload, self.ctx, self.limit = workload, ctx, limit
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        #: the iteration running (0 in setup())
        self.failed_at = 0
        self.ended = False
        self.started_at = self.stopped_at = time.monotonic()

    def run(self) -> None:
        ctx = self.ctx
        try:
            self.workload.setup(ctx)
            self.started_at = time.monotonic()
            while not ctx.stopping.is_set() and (self.limit is None or ctx.iteration < self.limit):
                self.failed_at = ctx.iteration + 1
                more = self.workload.step(ctx)
                with self.cond:
                    ctx.iteration += 1
                    self.cond.notify_all()
                if more is False:
                    break
        except BaseException as exc:  # reported by the runner, with context
            self.error = exc
        finally:
            self.stopped_at = time.monotonic()
            ctx.ended.set()
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def wait_for(self, iterations: int, progress_timeout: float) -> None:
        """Until ``iterations`` steps are done, the workload ended or failed.

        :raises TimeoutError: no step completed for ``progress_timeout`` seconds.
        """
        with self.cond:
            last, deadline = self.ctx.iteration, time.monotonic() + progress_timeout
            while self.ctx.iteration < iterations and not self.ended:
                if self.ctx.iteration != last:
                    last, deadline = self.ctx.iteration, time.monotonic() + progress_timeout
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the workload completed no iteration in {progress_timeout} s "
                                       f"(at iteration {self.ctx.iteration})")
                self.cond.wait(min(left, 0.5))

    def stop(self, timeout: float) -> None:
        """Ask the workload to stop after its current step and wait for it."""
        self.ctx.stopping.set()
        if self.is_alive():
            self.join(timeout)


def _read_stream(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the destination did not write it: the record says so with None
        return None


def migrate_under_load(device_type: str, workload: Workload | Callable[[WorkloadContext], bool | None], *,
                       count: int = 5, every: int | None = None, iterations: int | None = None,
                       transport: str = "unix", properties: str | Mapping[str, Any] | None = None,
                       destination_properties: str | Mapping[str, Any] | None = None,
                       destination_type: str | None = None,
                       plugin_specs: Sequence[str] = (), ram_size: int | None = None, probe: bool | None = None,
                       vectors: int = 0, start_timeout: float = 30.0, migration_timeout: float = 20.0,
                       progress_timeout: float = 60.0, stop_timeout: float = 30.0,
                       on_migration: Callable[[MigrationRecord, WorkloadContext], object] | None = None,
                       on_ready: Callable[[WorkloadContext], object] | None = None,
                       max_downtime_ms: float | None = None, keep_stream: int | None = None) -> MigrationRunResult:
    """Migrate a device of ``device_type`` between processes ``count`` times while
    ``workload`` keeps running on the software host (see the module docstring).

    :param device_type: a registered device type (``edu``, ``nvme``, a plugin's).
    :param workload: a :class:`Workload`, or a function ``step(ctx)`` (one iteration).
    :param count: how many migrations (each to a new process); 0 runs the workload
        (``every`` or ``iterations`` steps) without moving the device.
    :param every: workload iterations before each migration (and after the last);
        default ``iterations // (count + 1)`` when ``iterations`` is given, else 1.
    :param iterations: stop the workload after this many steps in all (default:
        ``every`` steps after the last migration, or the workload's own end).
    :param transport: ``unix`` (descriptors travel) or ``tcp`` (localhost, none do).
    :param properties: the device's properties (``key=value,...`` or a mapping;
        default: the workload's :attr:`Workload.properties`).
    :param destination_properties: the destinations' properties (default: the same);
        ones the fingerprint covers make a destination refuse the stream.
    :param destination_type: the destinations' device type (default: the same);
        another one makes a destination refuse the stream at its offer, as a test
        of refusals wants.
    :param plugin_specs: ``-p`` options of the device processes (``no:NAME``,
        ``MODULE``; :func:`pcidev.plugins.parse_plugin_specs`).
    :param ram_size: guest RAM of the host (default: the workload's :attr:`Workload.ram_size`).
    :param probe: enable the device (BARs, decoding, bus mastering, interrupt
        vectors) before :meth:`Workload.setup`; False when the workload's driver
        probes it itself (default: the workload's :attr:`Workload.probe`).
    :param vectors: interrupt vectors to allocate when probing (0: as many as
        offered, up to 32).
    :param start_timeout: seconds for a device process to start (and listen).
    :param migration_timeout: seconds for each migration.
    :param max_downtime_ms: the downtime budget of each migration's pre-copy
        (:meth:`~pcidev.transport.link.RemoteDevice.migrate`).
    :param progress_timeout: seconds the workload may take for one iteration.
    :param stop_timeout: seconds the workload may take to stop after its last step.
    :param on_migration: called after each migration with its record (on the caller's thread).
    :param on_ready: called once the device is plugged (and probed), before the workload starts.
    :param max_downtime_ms: the downtime budget of a pre-copy migration, passed to
        :meth:`~pcidev.transport.link.RemoteDevice.migrate` (None: its default); a
        :class:`~pcidev.errors.PcidevError` if this pcidev's device link has no pre-copy.
    :param keep_stream: keep the vmstate stream of this migration (1 for the first) in its
        ``stream`` (:class:`MigrationRecord`) (its destination writes what it loaded to a file).
    :returns: the run's result.
    :raises WorkloadError: the workload raised (``__cause__``) or stopped making progress.
    :raises MigrationError: a migration failed or was refused (the destination's
        reason in the message); the device had kept running on its source.
    :raises MigrationBlockedError: the device cannot migrate (its blockers).
    :raises PcidevError: a device process could not start (bad type, properties, plugins).
    """
    if transport not in TRANSPORTS:
        raise PcidevError(f"migrate_under_load(): transport must be one of {', '.join(TRANSPORTS)}, "
                          f"not {transport!r}")
    if count < 0:
        raise PcidevError(f"migrate_under_load(): count must be >= 0, not {count}")
    if every is None:
        every = max(1, iterations // (count + 1)) if iterations is not None else 1
    if every < 1:
        raise PcidevError(f"migrate_under_load(): every must be >= 1, not {every}")
    if iterations is not None and count and every * count >= iterations:
        raise PcidevError(f"migrate_under_load(): {count} migrations every {every} iterations need more than "
                          f"{every * count} iterations, not {iterations}: the last ones would run without load")
    work = workload if isinstance(workload, Workload) else _StepFunction(workload)
    if properties is None:
        properties = work.properties
    ram_size = work.ram_size if ram_size is None else ram_size
    probe = work.probe if probe is None else probe
    migrate_kwargs: dict[str, Any] = {}
    if max_downtime_ms is not None:
        if "max_downtime_ms" not in inspect.signature(RemoteDevice.migrate).parameters:
            raise PcidevError("migrate_under_load(): max_downtime_ms needs pre-copy, which this pcidev's "
                              "device link does not have")
        migrate_kwargs["max_downtime_ms"] = max_downtime_ms
    dest_props = properties if destination_properties is None else destination_properties
    workdir = tempfile.mkdtemp(prefix=f"pcidev-migrate-{os.getpid()}-")  # whose run it was
    procs: list[DeviceProcess] = []
    thread: _WorkloadThread | None = None
    records: list[MigrationRecord] = []

    def result(errors: Sequence[str] = ()) -> MigrationRunResult:
        seconds = thread.stopped_at - thread.started_at if thread is not None and thread.ended else \
            (time.monotonic() - thread.started_at if thread is not None else 0.0)
        return MigrationRunResult(device_type, transport, tuple(records),
                                  thread.ctx.iteration if thread is not None else 0, tuple(errors),
                                  seconds, tuple(p.pid for p in procs))

    def workload_failed(exc: BaseException | None = None, where: str = "") -> WorkloadError:
        assert thread is not None
        cause = exc if exc is not None else thread.error
        where = where or ("in setup()" if thread.failed_at == 0 else f"at iteration {thread.failed_at}")
        message = (f"the workload failed {where}, after {len(records)} of {count} migrations "
                   f"(device process {thread.ctx.pid}): {type(cause).__name__}: {cause}")
        err = WorkloadError(message, iteration=thread.failed_at, migrations=len(records),
                            result=result([f"{type(cause).__name__}: {cause}"]))
        err.__cause__ = cause
        return err

    try:
        source = DeviceProcess(device_type, f"unix:{workdir}/dev-0.sock", options=properties,
                               plugin_specs=plugin_specs)
        procs.append(source)
        # destinations start once the source is up: a device may create files its
        # fingerprint names (NVMe's image identity) that they must find, not race for
        source.wait_event("ready", timeout=start_timeout)

        def start_destination(k: int) -> None:
            # one destination at a time, started while the workload runs before the
            # migration that needs it: no process waits for an incoming migration longer
            # than one workload interval, however many migrations are asked for
            incoming = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{workdir}/dev-{k}-in.sock"
            procs.append(DeviceProcess(destination_type or device_type, f"unix:{workdir}/dev-{k}.sock",
                                       options=dest_props, incoming=incoming, plugin_specs=plugin_specs,
                                       save_incoming=f"{workdir}/stream-{k}.bin" if k == keep_stream else None))

        if count:
            start_destination(1)
        with Machine(ram_size=ram_size) as machine:
            pdev = machine.plug_remote(source.link, timeout=start_timeout)
            remote = pdev.device
            if not isinstance(remote, RemoteDevice):  # plug_remote's handle holds the link proxy
                raise PcidevError(f"plug_remote gave a {type(remote).__name__}, not a RemoteDevice")
            if probe:
                probe_device(pdev, vectors)
            ctx = WorkloadContext(machine, pdev)
            if on_ready is not None:
                on_ready(ctx)
            thread = _WorkloadThread(work, ctx, iterations)
            try:
                thread.start()
                for k in range(1, count + 1):
                    try:
                        thread.wait_for(k * every, progress_timeout)
                    except TimeoutError as exc:
                        raise workload_failed(exc) from exc
                    if thread.error is not None:
                        raise workload_failed()
                    src_pid, dest = procs[k - 1].pid, procs[k]
                    address = str(dest.wait_event("listening", timeout=start_timeout)["incoming"])
                    if thread.error is not None:  # it kept running while the destination started
                        raise workload_failed()
                    record = None
                    try:
                        try:
                            work.before_migration(ctx, k)
                        except Exception as exc:
                            raise workload_failed(exc, f"in before_migration() of migration {k}") from exc
                        at = ctx.iteration
                        try:
                            report = remote.migrate(address, timeout=migration_timeout, **migrate_kwargs)
                        except PcidevError as exc:
                            exc.add_note(f"migration {k} of {count} of {device_type} (process {src_pid} -> "
                                         f"{dest.pid}, {transport}) at workload iteration {at}; "
                                         f"{len(records)} migrations had succeeded")
                            raise
                        loaded = dest.wait_event("incoming", timeout=start_timeout)
                        ctx.migrations = k
                        record = MigrationRecord(
                            index=k, source_pid=src_pid, destination_pid=dest.pid, iteration=at,
                            state_size=int(report["state_size"]), fds=int(report["fds"]),
                            downtime=report.get("downtime"),
                            downtime_upper_bound=float(report["downtime_upper_bound"]),
                            host_pause=float(report["host_pause"]),
                            sections=tuple(loaded.get("sections") or ()), report=report,
                            stream=_read_stream(f"{workdir}/stream-{k}.bin") if k == keep_stream else None)
                        records.append(record)
                    finally:
                        work.after_migration(ctx, record)
                    for done in procs[:k]:  # reap the sources that exited (no zombie per migration)
                        done.proc.poll()
                    if k < count:
                        start_destination(k + 1)
                    if on_migration is not None:
                        on_migration(record, ctx)
                try:  # `every` more steps, or up to the limit (the workload then ends by itself)
                    thread.wait_for((count + 1) * every if iterations is None else iterations, progress_timeout)
                except TimeoutError as exc:
                    raise workload_failed(exc) from exc
                thread.stop(stop_timeout)
                if thread.error is not None:
                    raise workload_failed()
                if thread.is_alive():
                    stuck = TimeoutError(f"the workload did not stop within {stop_timeout} s")
                    raise workload_failed(stuck) from stuck
                try:
                    work.verify(ctx)
                except Exception as exc:
                    raise workload_failed(exc, "in verify()") from exc
            finally:
                thread.stop(stop_timeout)
        return result()
    finally:
        for proc in procs:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
