"""The engines behind ``pcidev fuzz``: libFuzzer through atheris (coverage-guided), and
a pure-Python random mutator (no coverage, no extra to install).

Both run one :class:`~pcidev.testing.fuzz.FuzzTarget` for a number of seconds,
keep going after a finding (each distinct one, by
:attr:`~pcidev.testing.fuzz.FuzzFinding.signature`, is saved once to the
findings directory with a ``.txt`` beside it) and return a :class:`FuzzReport`.

atheris runs in a child process (``pcidev.testing.fuzz._libfuzzer``): libFuzzer
ends the process it runs in, and its statistics (``cov:`` edges, ``ft:`` features,
``exec/s``) come on its standard error, which the parent parses. libFuzzer's own
findings end its run: an input past ``-rss_limit_mb`` (:data:`RSS_LIMIT_MB`), past
``-timeout``, or a crash of the interpreter; the parent reports each with the input
libFuzzer saved (:func:`libfuzzer_findings`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from pcidev.errors import PcidevError
from pcidev.plugins import load_registry, make_plugin_manager, parse_plugin_specs
from pcidev.testing.fuzz.catalogue import target_factories
from pcidev.testing.fuzz.target import FuzzFinding, FuzzTarget, RssWatch

__all__ = ["FuzzReport", "FindingLog", "StopSignals", "atheris_available", "instrumentation_args",
           "instrumented_modules", "libfuzzer_findings", "parse_libfuzzer", "run_atheris", "run_random",
           "ATHERIS_MISSING", "RSS_LIMIT_MB", "STOP_GRACE"]

#: The one error line when the coverage-guided engine is asked for without its extra.
ATHERIS_MISSING = ("atheris is not installed: install the fuzz extra (pip install 'pcidev[fuzz]') "
                   "or use --engine random")

_STAT = re.compile(r"^#(\d+)\s+(\w+)\s+(.*)$")
_FIELD = re.compile(r"(cov|ft|corp|exec/s|rss):\s*(\S+)")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_ERROR = re.compile(r"^==\d+==\s*ERROR: libFuzzer: (.+)$")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
#: libFuzzer's ``-rss_limit_mb``: the resident set (MiB) past which it ends the run with an
#: ``out-of-memory`` finding (it looks every second; the input it names is the one running then)
RSS_LIMIT_MB = 4096
#: seconds the atheris children get, after SIGTERM or SIGINT reached ``pcidev fuzz``, to
#: print their figures and exit before they are killed (a second signal kills them at once)
STOP_GRACE = 10.0
#: the child's program (kept in step with pcidev.testing.fuzz._libfuzzer.BOOTSTRAP, which a
#: test compares: this module cannot import that one, which needs atheris)
_BOOTSTRAP = """
import sys, atheris
from importlib.metadata import entry_points
args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
packages = [a for f, a in zip(args, args[1:]) if f == "-i"] or \
    ["pcidev", *sorted({ep.value.split(":")[0].split(".")[0] for ep in entry_points(group="pcidev")})]
with atheris.instrument_imports(include=packages, exclude=[a for f, a in zip(args, args[1:]) if f == "-x"]):
    from pcidev.testing.fuzz import _libfuzzer as libfuzzer
    prepared = libfuzzer.prepare(sys.argv[1:])
libfuzzer.fuzz(*prepared)
"""


@attrs.define
class FuzzReport:
    """What one fuzzing run did."""

    target: str
    engine: str
    seconds: float
    executions: int = 0
    #: libFuzzer's covered edges (``cov``) and features (``ft``); None for the random engine
    coverage: int | None = None
    features: int | None = None
    corpus: int = 0
    findings: list[str] = attrs.field(factory=list)
    #: wall time including the child's start-up and instrumentation (atheris), if known
    wall: float | None = None
    #: the signal (SIGTERM, SIGINT) that ended the run before its time, if one did
    interrupted: int | None = None

    @property
    def exec_per_second(self) -> float:
        """Executions per second of wall time."""
        return self.executions / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The report, one figure a line (what ``pcidev fuzz`` prints)."""
        cov = "n/a (random engine: no instrumentation)" if self.coverage is None else \
            f"{self.coverage} edges, {self.features} features"
        stopped = "" if self.interrupted is None else f", stopped by {signal.Signals(self.interrupted).name}"
        out = [f"target:      {self.target} ({self.engine})",
               f"run:         {self.seconds:.1f} s" + ("" if self.wall is None else
                                                         f" fuzzing ({self.wall:.1f} s with start-up)") + stopped,
               f"executions:  {self.executions} ({self.exec_per_second:.1f} exec/s)",
               f"coverage:    {cov}",
               f"corpus:      {self.corpus} inputs",
               f"findings:    {len(self.findings)}"]
        out += [f"  {line}" for line in self.findings]
        return out


class StopSignals:
    """SIGTERM and SIGINT while a run is on stop the run instead of the process, so that
    its figures are still reported (and no child is left running): the handlers record
    the signal (:attr:`signum`, :attr:`count`, :attr:`at`) and the run looks at them.

    Installed only on the main thread (Python runs handlers there); elsewhere, and after
    the ``with`` block, the previous handlers are in place.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        #: the first signal received, or None
        self.signum: int | None = None
        #: signals received so far
        self.count = 0
        #: when the first one came (monotonic)
        self.at = 0.0
        #: a second signal raises :class:`KeyboardInterrupt` where the main thread is (the
        #: random engine: its input runs in this process and may never return)
        self.interrupt_on_second = False
        self._old: dict[int, Any] = {}  # (signal.getsignal's result: a handler, an int or None)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
        self.count += 1
        if self.count > 1 and self.interrupt_on_second:
            raise KeyboardInterrupt  # (an input that does not return: stop inside it)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():  # (None: a handler set outside Python, not restorable)
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old.clear()


class FindingLog:
    """Saves each distinct finding's input once, as ``<target>-<signature hash>.bin`` with
    a ``.txt`` holding the finding's line and traceback.

    :param directory: where to save (created).
    :param target: the target's name.
    """

    def __init__(self, directory: Path, target: str) -> None:
        self.directory = directory
        self.target = target
        self.seen: dict[str, str] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def record(self, finding: FuzzFinding, data: bytes) -> str | None:
        """Save ``data`` if ``finding`` is new; returns its one-line description then."""
        if finding.signature in self.seen:
            return None
        digest = hashlib.sha1(finding.signature.encode()).hexdigest()[:12]
        path = self.directory / f"{self.target}-{digest}.bin"
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(f"{finding}\nsignature: {finding.signature}\n\n{finding.trace}")
        line = f"{path}: {finding}"
        self.seen[finding.signature] = line
        return line


def run_one(target: FuzzTarget, data: bytes, log: FindingLog, rss: RssWatch | None = None) -> str | None:
    """Run one input; a finding (or any exception a target lets out) is recorded.

    :param rss: the memory-growth watch to tick after the input (the engines pass one).
    :returns: the finding's line if it was new.
    """
    try:
        target.run(data)
        if rss is not None:
            rss.tick()
    except FuzzFinding as finding:
        return log.record(finding, data)
    except Exception as exc:
        return log.record(FuzzFinding.escaped(exc, f"target {target.name}"), data)
    return None


def _load_corpus(corpus: Path | None, target: FuzzTarget) -> list[bytes]:
    found = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()] if corpus and corpus.is_dir() else []
    return found or list(target.seeds()) or [b""]


def _mutate(rng: random.Random, data: bytes, pool: Sequence[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(6)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and len(buf) > 1:
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randrange(1, 9)]
        elif op == 4 and pool:
            other = rng.choice(pool)
            i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 5 and buf:
            i = rng.randrange(len(buf))
            buf[i:i + 4] = rng.choice((b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x01\0\0\0", b"\0\0\0\x80"))
    return bytes(buf[:4096])


def run_random(target: FuzzTarget, *, seconds: float, corpus: Path | None, findings: Path,
               seed: int | None = None, echo: Callable[[str], None] = print) -> FuzzReport:
    """Fuzz ``target`` with random mutations of its corpus (no coverage feedback).

    :param target: the target (its :meth:`~pcidev.testing.fuzz.FuzzTarget.setup` is called here).
    :param seconds: how long to run.
    :param corpus: a directory of inputs to start from (default: the target's seeds).
    :param findings: where to save findings.
    :param seed: the random seed (None: random).
    :param echo: where finding lines go as they are found.
    :returns: the report.
    """
    rng = random.Random(seed)
    rss = RssWatch()
    pool = _load_corpus(corpus, target)
    log = FindingLog(findings, target.name)
    report = FuzzReport(target.name, "random", seconds, corpus=len(pool))
    target.setup()
    started = time.monotonic()
    logging.disable(logging.WARNING)  # a refusal's warning is the expected outcome; errors still show
    try:
        with StopSignals() as stop:
            stop.interrupt_on_second = True
            try:
                for data in pool:
                    if stop.signum is not None:
                        break
                    report.executions += 1
                    line = run_one(target, data, log, rss)
                    if line:
                        echo(line)
                while stop.signum is None and time.monotonic() - started < seconds:
                    report.executions += 1
                    line = run_one(target, _mutate(rng, rng.choice(pool), pool), log, rss)
                    if line:
                        echo(line)
            except KeyboardInterrupt:
                if stop.count < 2:  # (not the second signal's: someone else's)
                    raise
    finally:
        logging.disable(logging.NOTSET)
        target.close()
    report.seconds = time.monotonic() - started
    report.interrupted = stop.signum
    report.findings = list(log.seen.values())
    return report


def atheris_available() -> bool:
    """Whether the coverage-guided engine can run (the ``fuzz`` extra is installed)."""
    return importlib.util.find_spec("atheris") is not None


def parse_libfuzzer(text: str, report: FuzzReport) -> None:
    """Take executions, ``cov``, ``ft`` and corpus size from libFuzzer's standard error
    (its last statistics line wins).

    :param text: what libFuzzer printed.
    :param report: updated in place.
    """
    for line in text.splitlines():
        m = _STAT.match(line.strip())
        if m:
            report.executions = max(report.executions, int(m.group(1)))
            fields = dict(_FIELD.findall(m.group(3)))
            if "cov" in fields:
                report.coverage = int(fields["cov"])
            if "ft" in fields:
                report.features = int(fields["ft"])
            if "corp" in fields:
                report.corpus = int(fields["corp"].split("/")[0])
        d = _DONE.match(line.strip())
        if d:
            report.executions = max(report.executions, int(d.group(1)))
            report.seconds = max(1.0, float(d.group(2)))  # libFuzzer's own clock: without the start-up


def libfuzzer_findings(text: str) -> list[str]:
    """The findings libFuzzer itself reports in its output (``==PID== ERROR: libFuzzer: ...``: an
    ``out-of-memory``, a ``timeout``, a ``deadly signal``), each with the input it saved.

    :param text: what libFuzzer printed.
    :returns: one line each, ``PATH: libFuzzer: WHAT`` (``(no input saved)`` for the path if
        it wrote none).
    """
    out: list[str] = []
    error: str | None = None
    for line in text.splitlines():
        m = _ERROR.match(line.strip())
        if m:
            if error is not None:
                out.append(f"(no input saved): libFuzzer: {error}")
            error = m.group(1).strip()
            continue
        a = _ARTIFACT.search(line)
        if a and error is not None:
            out.append(f"{a.group(1)}: libFuzzer: {error}")
            error = None
    if error is not None:
        out.append(f"(no input saved): libFuzzer: {error}")
    return out


def instrumented_modules(name: str, plugin_specs: Sequence[str] = ()) -> tuple[str, ...]:
    """The modules whose coverage guides the target ``name``: its
    :attr:`~pcidev.testing.fuzz.FuzzTarget.instrument`, or ``()`` for the default (pcidev
    and every plugin package).

    :param name: the target's name (an unknown one gives ``()``: the child reports it).
    :param plugin_specs: the ``-p`` options (the plugin selection the target comes from).
    """
    blocked, extra = parse_plugin_specs(list(plugin_specs))
    factory = target_factories(load_registry(make_plugin_manager(blocked=blocked, plugins=extra))).get(name)
    return tuple(getattr(factory, "instrument", ()) or ())


def _modules_of(package: str) -> list[str]:
    """Every module of the top-level ``package``, from its files (nothing is imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise PcidevError(f"fuzz instrumentation: no package {package!r}")
    out = [package]
    for root in spec.submodule_search_locations or ():
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if os.path.isfile(os.path.join(here, d, "__init__.py")))
            rel = os.path.relpath(here, root)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            if prefix != package:
                out.append(prefix)
            out += [f"{prefix}.{f[:-3]}" for f in sorted(files) if f.endswith(".py") and f != "__init__.py"]
    return out


def instrumentation_args(instrument: Sequence[str]) -> list[str]:
    """The child's ``-i PACKAGE`` / ``-x MODULE`` options for a target's
    :attr:`~pcidev.testing.fuzz.FuzzTarget.instrument`.

    atheris instruments whole top-level packages (``include``) less modules named exactly
    (``exclude``): each top-level package of ``instrument`` is included, and every module
    of it that no entry covers (an entry covers itself and its submodules; an entry
    starting with ``-`` takes a module and its submodules out again) is excluded.

    :param instrument: the target's entries (empty: no options, the default scope).
    :returns: the options, in pairs.
    :raises PcidevError: an entry names no installed package.
    """
    def covered(module: str, entries: list[str]) -> bool:
        return any(module == e or module.startswith(e + ".") for e in entries)

    keep = [e for e in instrument if not e.startswith("-")]
    drop = [e[1:] for e in instrument if e.startswith("-")]
    out: list[str] = []
    for top in dict.fromkeys(e.split(".")[0] for e in keep):
        out += ["-i", top]
        for module in _modules_of(top):
            if not covered(module, keep) or covered(module, drop):
                out += ["-x", module]
    return out


def run_atheris(name: str, *, seconds: float, corpus: Path | None, findings: Path, jobs: int = 1,
                plugin_specs: Sequence[str] = (), seed: int | None = None,
                echo: Callable[[str], None] = print, instrument: Sequence[str] | None = None) -> FuzzReport:
    """Fuzz the target ``name`` with libFuzzer (atheris) in a child process.

    :param name: the target's name (the child finds it as ``pcidev fuzz`` does).
    :param seconds: libFuzzer's ``-max_total_time``.
    :param corpus: the corpus directory libFuzzer reads and adds to (default: a fresh
        one under ``findings``, filled with the target's seeds).
    :param findings: where findings are saved.
    :param jobs: children fuzzing at once, sharing the corpus (executions add up; coverage,
        features and corpus are the largest any child reported; ``seed`` + i for child i).
    :param plugin_specs: the ``-p`` options, for the child's plugin selection.
    :param seed: libFuzzer's ``-seed``.
    :param echo: where finding lines go.
    :param instrument: the modules to instrument for coverage (default: the target's
        :attr:`~pcidev.testing.fuzz.FuzzTarget.instrument`, :func:`instrumented_modules`);
        ``()`` instruments pcidev and every plugin package.
    :returns: the report.
    :raises PcidevError: atheris is missing (:data:`ATHERIS_MISSING`) or the child failed
        before fuzzing.
    """
    if not atheris_available():
        raise PcidevError(ATHERIS_MISSING)
    findings.mkdir(parents=True, exist_ok=True)
    corpus_dir = corpus if corpus is not None else findings / f"corpus-{name}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _BOOTSTRAP, name, str(findings)]
    for spec in plugin_specs:
        cmd += ["-p", spec]
    cmd += instrumentation_args(instrumented_modules(name, plugin_specs) if instrument is None else instrument)
    cmd += ["--", f"-max_total_time={max(1, int(seconds))}", "-print_final_stats=1", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={findings}{os.sep}"]
    # one child per job, each with its own seed, all sharing the corpus directory (libFuzzer
    # reloads what the others add); not libFuzzer's own -jobs, which re-runs the child
    # through a shell command line that the bootstrap's -c program does not survive
    cmds = [cmd + ([] if seed is None else [f"-seed={seed + i}"]) + [str(corpus_dir)] for i in range(max(1, jobs))]
    started = time.monotonic()
    outputs, stopped = _run_children(cmds)
    report = FuzzReport(name, "atheris", time.monotonic() - started, interrupted=stopped)
    clocks = []  # each child's own fuzzing time, from its "Done" line
    for output in outputs:
        one = FuzzReport(name, "atheris", -1.0)
        parse_libfuzzer(output, one)
        report.executions += one.executions
        if one.coverage is not None:
            report.coverage = max(report.coverage or 0, one.coverage)
        if one.features is not None:
            report.features = max(report.features or 0, one.features)
        report.corpus = max(report.corpus, one.corpus)
        if one.seconds >= 0:
            clocks.append(one.seconds)
    if len(clocks) == len(outputs):
        report.seconds = max(clocks)
    report.wall = time.monotonic() - started
    for output in outputs:  # (a finding two jobs made is the same file, the same line: once)
        found = [line[len("FINDING "):] for line in output.splitlines() if line.startswith("FINDING ")]
        for line in [*found, *libfuzzer_findings(output)]:  # (libFuzzer's own: the job ended on it)
            if line not in report.findings:
                report.findings.append(line)
                echo(line)
    if report.executions == 0 and not report.findings and stopped is None:
        tail = [ln for ln in outputs[0].splitlines() if ln.strip()][-1:] or ["no output"]
        raise PcidevError(f"the fuzzer of {name} did not run: {tail[0]}")
    return report


def _run_children(cmds: list[list[str]]) -> tuple[list[str], int | None]:
    """Run the child commands at once; each one's output (standard output and error), and
    the signal that stopped the run early, if one did.

    pcidev must be imported by a child inside atheris's instrumentation, not from this
    process's cached state: a fresh interpreter, the same sys.path. Each child writes to
    its own unlinked temporary file, read once all have ended. SIGTERM or SIGINT is passed
    on to the children as SIGTERM (libFuzzer prints its figures and exits); those still
    running :data:`STOP_GRACE` seconds later, or at a second signal, are killed.
    """
    files = [tempfile.TemporaryFile() for _ in cmds]
    try:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with StopSignals() as stop:
                for c, f in zip(cmds, files, strict=True):  # (each one in procs as soon as it runs)
                    procs.append(subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT))
                passed_on = False
                while any(p.poll() is None for p in procs):
                    if stop.signum is not None:
                        if not passed_on:
                            passed_on = True
                            for p in procs:
                                if p.poll() is None:
                                    p.terminate()
                        if stop.count > 1 or time.monotonic() - stop.at > STOP_GRACE:
                            break
                    time.sleep(0.1)
        finally:
            for p in procs:  # (an interrupted parent takes its children with it)
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for f in files:
            f.seek(0)
            outputs.append(f.read().decode("utf-8", "replace"))
        return outputs, stop.signum
    finally:
        for f in files:
            f.close()
