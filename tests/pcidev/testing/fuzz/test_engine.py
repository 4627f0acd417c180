"""The fuzzing toolkit without atheris: the input reader, finding records, the random
engine, libFuzzer's statistics, and each framework target's invariant checks firing
when the code under test is broken on purpose."""

from __future__ import annotations

import ast
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcidev.migration import frames
from pcidev.testing.fuzz import (
    FuzzFinding,
    FuzzInput,
    FuzzTarget,
    engine,
    link_target,
    migration_target,
    vfio_user_target,
    vmstate_target,
)
from pcidev.testing.fuzz.engine import FuzzReport, parse_libfuzzer, run_random
from pcidev.vmstate.stream import open_stream


def test_fuzz_input_reads_little_endian_and_zeros_past_the_end():
    inp = FuzzInput(b"\x01\x02\x03\x04\x05")
    assert inp.u16() == 0x0201
    assert inp.u32() == 0x00050403  # three bytes left, then a zero
    assert inp.remaining == 0
    assert inp.u64() == 0 and inp.take(3) == b"\0\0\0"
    assert FuzzInput(b"\x02").pick((7, 8, 9)) == 9


class _Toy(FuzzTarget):
    name = "toy"
    calls = 0

    def run(self, data: bytes) -> None:
        type(self).calls += 1
        if b"\xde" in data:
            raise FuzzFinding("toy-invariant", "saw 0xde", where="toy")
        if b"\xad" in data:
            raise ValueError("a bug in the target itself")

    def seeds(self) -> Iterator[bytes]:
        yield b"\xde\x00"
        yield b"\xad"
        yield b"ok"


def test_random_engine_records_each_distinct_finding_once_with_its_input(tmp_path):
    lines: list[str] = []
    report = run_random(_Toy(), seconds=0.5, corpus=None, findings=tmp_path, seed=1, echo=lines.append)
    assert report.executions == _Toy.calls >= 3
    assert len(report.findings) == 2 == len(lines)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 4 and all(p.startswith("toy-") for p in saved)
    by_text = {p.read_text().splitlines()[0]: p.with_suffix(".bin") for p in tmp_path.glob("*.txt")}
    assert by_text["toy-invariant: saw 0xde"].read_bytes() == b"\xde\x00"
    escaped = next(t for t in by_text if t.startswith("escaped-exception"))
    assert "ValueError: a bug in the target itself" in escaped
    text = "\n".join(report.lines())
    assert "(random)" in text and "exec/s" in text and "findings:    2" in text


def test_random_engine_starts_from_a_corpus_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a").write_bytes(b"\xde")
    report = run_random(_Toy(), seconds=0.1, corpus=corpus, findings=tmp_path / "f", seed=2)
    assert report.corpus == 1 and report.findings


def test_libfuzzer_statistics_are_parsed():
    out = ("INFO: Seed: 1\n#2\tINITED cov: 589 ft: 590 corp: 1/1b exec/s: 0 rss: 73Mb\n"
           "#1024\tpulse  cov: 900 ft: 1200 corp: 40/2Kb lim: 21 exec/s: 341 rss: 90Mb\n"
           "#2374\tDONE   cov: 1115 ft: 1842 corp: 105/9Kb lim: 200 exec/s: 76 rss: 120Mb\n"
           "Done 2374 runs in 31 second(s)\n")
    report = FuzzReport("x", "atheris", 99.0)
    parse_libfuzzer(out, report)
    assert (report.executions, report.coverage, report.features, report.corpus) == (2374, 1115, 1842, 105)
    assert report.seconds == 31.0 and round(report.exec_per_second) == 77


_OOM = ("#2374\tpulse  cov: 1115 ft: 1842 corp: 105/9Kb lim: 200 exec/s: 76 rss: 3900Mb\n"
        "==20579== ERROR: libFuzzer: out-of-memory (used: 4100Mb; limit: 4096Mb)\n"
        "   To change the out-of-memory limit use -rss_limit_mb=<N>\n\n"
        "MS: 2 ChangeBit-InsertByte-; base unit: 0000000000000000000000000000000000000000\n0x41,\nA\n"
        "artifact_prefix='f/'; Test unit written to f/oom-6dcd4ce23d88e2ee9568ba546c007c63d9131c1b\n"
        "Base64: QQ==\nSUMMARY: libFuzzer: out-of-memory\n")


def test_libfuzzers_own_findings_are_parsed():
    assert engine.libfuzzer_findings(_OOM) == [
        "f/oom-6dcd4ce23d88e2ee9568ba546c007c63d9131c1b: libFuzzer: out-of-memory (used: 4100Mb; limit: 4096Mb)"]
    out = ("==7== ERROR: libFuzzer: timeout after 1200 seconds\nTest unit written to f/timeout-ab\n"
           "==7== ERROR: libFuzzer: deadly signal\n")
    assert engine.libfuzzer_findings(out) == ["f/timeout-ab: libFuzzer: timeout after 1200 seconds",
                                              "(no input saved): libFuzzer: deadly signal"]
    assert engine.libfuzzer_findings("Done 3 runs in 1 second(s)\n") == []


@pytest.mark.parametrize("stats", [True, False])  # (without: on the seed corpus, before any statistics)
def test_the_engine_reports_libfuzzers_out_of_memory(monkeypatch, tmp_path, stats):
    output = _OOM if stats else _OOM.split("\n", 1)[1]
    monkeypatch.setattr(engine, "atheris_available", lambda: True)
    monkeypatch.setattr(engine, "_run_children", lambda cmds: ([output] * len(cmds), None))
    echoed: list[str] = []
    report = engine.run_atheris("vmstate", seconds=1, corpus=None, findings=tmp_path, echo=echoed.append)
    assert report.findings == echoed == [
        "f/oom-6dcd4ce23d88e2ee9568ba546c007c63d9131c1b: libFuzzer: out-of-memory (used: 4100Mb; limit: 4096Mb)"]
    assert report.executions == (2374 if stats else 0)


def test_the_engine_and_the_child_run_the_same_bootstrap():
    source = (Path(engine.__file__).parent / "_libfuzzer.py").read_text()
    tree = ast.parse(source)
    value = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and [getattr(t, "id", "") for t in node.targets] == ["BOOTSTRAP"])
    assert isinstance(value, ast.Constant) and value.value == engine._BOOTSTRAP


def _pairs(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i in range(0, len(args), 2) if args[i] == flag]


def test_instrumentation_scope_is_whole_packages_less_the_modules_no_entry_covers():
    args = engine.instrumentation_args(("pcidev_nvme", "-pcidev_nvme.testing.driver", "pcidev.pci", "pcidev.dma"))
    assert _pairs(args, "-i") == ["pcidev_nvme", "pcidev"]
    excluded = set(_pairs(args, "-x"))
    assert len(args) == 2 * (2 + len(excluded))
    assert {"pcidev_nvme.testing.driver", "pcidev.host.machine", "pcidev.host", "pcidev", "pcidev.device",
            "pcidev.testing.fuzz.engine"} <= excluded
    assert not {"pcidev_nvme", "pcidev_nvme.controller", "pcidev_nvme.backends.mem", "pcidev_nvme.testing.fuzz",
                "pcidev.pci", "pcidev.pci.config", "pcidev.pci.capabilities.msix", "pcidev.dma"} & excluded
    assert engine.instrumentation_args(()) == []  # the default scope: the bootstrap's own
    with pytest.raises(engine.PcidevError, match="no package"):
        engine.instrumentation_args(("no_such_package_anywhere",))


def test_a_target_names_its_instrumentation_scope():
    assert engine.instrumented_modules("vmstate") == ()
    assert engine.instrumented_modules("nvme-guest")[0] == "pcidev_nvme"
    assert engine.instrumented_modules("nvme-guest", ["no:nvme"]) == ()  # (no such target then)


def test_the_child_instruments_what_it_is_told(tmp_path):
    """The bootstrap's own argument handling, with an atheris that only reports its scope."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "atheris.py").write_text(
        "import json, sys\n"
        "def instrument_imports(include, exclude):\n"
        "    print(json.dumps([include, exclude]))\n"
        "    sys.exit(0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), *sys.path])}

    def scope(*args: str) -> list[list[str]]:
        out = subprocess.run([sys.executable, "-c", engine._BOOTSTRAP, "nvme-guest", str(tmp_path), *args,
                              "--", "-runs=1", "-i", "not-ours"], capture_output=True, text=True, env=env,
                             check=True, timeout=60)
        return json.loads(out.stdout)

    include, exclude = scope("-p", "no:virtio", "-i", "pcidev_nvme", "-x", "pcidev_nvme.testing.driver")
    assert (include, exclude) == (["pcidev_nvme"], ["pcidev_nvme.testing.driver"])
    include, exclude = scope()  # no -i: pcidev and every plugin package, as before
    assert include[0] == "pcidev" and "pcidev_nvme" in include and exclude == []


def test_the_engine_passes_the_targets_scope_to_the_child(monkeypatch, tmp_path):
    seen: list[list[str]] = []

    def fake_run(cmds):
        seen.extend(cmds)
        return ["Done 3 runs in 1 second(s)\n"] * len(cmds), None

    monkeypatch.setattr(engine, "atheris_available", lambda: True)
    monkeypatch.setattr(engine, "_run_children", fake_run)
    engine.run_atheris("nvme-guest", seconds=1, corpus=None, findings=tmp_path)
    engine.run_atheris("vmstate", seconds=1, corpus=None, findings=tmp_path)
    engine.run_atheris("nvme-guest", seconds=1, corpus=None, findings=tmp_path, instrument=())
    guest, edu, full = (cmd[:cmd.index("--")] for cmd in seen)
    assert _pairs(guest[3:], "-i") == ["pcidev_nvme", "pcidev"] and "pcidev_nvme.testing.driver" in guest
    assert "-i" not in edu and "-i" not in full


def test_without_atheris_the_coverage_engine_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "atheris_available", lambda: False)
    with pytest.raises(engine.PcidevError, match=r"pip install 'pcidev\[fuzz\]'"):
        engine.run_atheris("vmstate", seconds=1, corpus=None, findings=tmp_path)


# ---------------------------------------------------------------- each target's checks fire

def test_vfio_user_target_reports_an_exception_escaping_the_server(monkeypatch):
    def boom(self):
        raise RuntimeError("escaped on purpose")

    monkeypatch.setattr(vfio_user_target.VfioUserServer, "serve", boom)
    with pytest.raises(FuzzFinding) as info:
        vfio_user_target.VfioUserTarget().run(b"\x01")
    assert info.value.invariant == "escaped-exception" and "escaped on purpose" in str(info.value)


def test_vfio_user_target_reports_a_missing_reply(monkeypatch):
    real = vfio_user_target.VfioUserServer.serve

    def deaf(self):
        self.sock.recv(4096)  # takes the first message, answers nothing, keeps the socket
        return real(self)

    monkeypatch.setattr(vfio_user_target.VfioUserServer, "serve", deaf)
    monkeypatch.setattr(vfio_user_target, "REPLY_SECONDS", 0.3)
    with pytest.raises(FuzzFinding) as info:
        vfio_user_target.VfioUserTarget().run(b"\x01")
    assert info.value.invariant == "no-reply"


def test_link_target_reports_a_server_bug(monkeypatch):
    def broken(self, kind, body, fds, *, conn=None):
        raise KeyError("a bug in dispatch")

    monkeypatch.setattr(link_target.LinkServer, "dispatch", broken)
    with pytest.raises(FuzzFinding) as info:
        link_target.LinkTarget().run(bytes([0, 0]))
    assert info.value.invariant in ("internal-error", "logged-traceback")


def test_vmstate_target_reports_an_untyped_load_error(monkeypatch):
    target = vmstate_target.VmstateTarget()
    target.setup()
    try:
        target.run(bytes(12))  # the unbroken loader takes or refuses it with a typed error

        def broken(dev, data, fds=None):
            raise KeyError("untyped")

        monkeypatch.setattr(vmstate_target, "load_device_stream", broken)
        with pytest.raises(FuzzFinding) as info:
            target.run(bytes(12))
        assert info.value.invariant == "escaped-exception" and "KeyError" in info.value.where
    finally:
        target.close()


def test_vmstate_mutations_keep_a_valid_envelope():
    target = vmstate_target.VmstateTarget()
    target.setup()
    try:
        for seed in range(20):
            stream = target.mutate(FuzzInput(struct.pack("<QQ", seed * 0x9E3779B97F4A7C15 % (1 << 64), seed)))
            open_stream(stream)  # the CRC and the prefix are right: the mutations reach the body's checks
    finally:
        target.close()


def test_vmstate_body_positions_are_depth_first_in_order():
    body = {"a": [1, {"b": 2}], "c": {"d": [], "e": 3}}
    assert vmstate_target._paths(body) == [
        (), ("a",), ("a", 0), ("a", 1), ("a", 1, "b"), ("c",), ("c", "d"), ("c", "e")]


def test_vmstate_mutation_of_an_input_is_the_same_every_time():
    target = vmstate_target.VmstateTarget()
    target.setup()
    try:
        data = [struct.pack("<QQ", seed * 0x9E3779B97F4A7C15 % (1 << 64), seed) for seed in range(10)]
        first = [target.mutate(FuzzInput(d)) for d in data]
        assert [target.mutate(FuzzInput(d)) for d in reversed(data)] == first[::-1]
        other = vmstate_target.VmstateTarget()  # (a fresh target: nothing cached yet)
        other.setup()
        try:
            assert [other.mutate(FuzzInput(d)) for d in data] == first
        finally:
            other.close()
    finally:
        target.close()


def test_migration_target_replays_a_real_source_and_reports_an_untyped_error(monkeypatch):
    target = migration_target.MigrationTarget()
    target.setup()
    assert [kind for kind, _body, _n in target.frames][:2] == [frames.CHECK, frames.OFFER]
    results = []
    real = migration_target.migrate_in

    def watched(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(migration_target, "migrate_in", watched)
    target.run(bytes([11] * 16))  # every frame as recorded: the destination takes the device
    assert len(results) == 1 and results[0].running_at is not None

    def broken(*args, **kwargs):
        raise AttributeError("untyped")

    monkeypatch.setattr(migration_target, "migrate_in", broken)
    with pytest.raises(FuzzFinding) as info:
        target.run(bytes([11] * 16))
    assert info.value.invariant == "escaped-exception" and "AttributeError" in info.value.where


_FAKE_ATHERIS = """
import contextlib, os, sys
def instrument_imports(include, exclude):
    return contextlib.nullcontext()
_args = []
def Setup(argv, one_input):
    _args[:] = argv
    one_input(b"")
def Fuzz():
    seed = int(next(a for a in _args if a.startswith("-seed="))[6:])
    corpus = _args[-1]
    n = 1000 * seed
    open(os.path.join(corpus, f"from-{seed}"), "w").close()
    print(f"#{n}\\tDONE   cov: {10 + seed} ft: {20 + seed} corp: {seed}/9b exec/s: 1 rss: 9Mb", file=sys.stderr)
    print(f"Done {n} runs in {seed} second(s)", file=sys.stderr)
    print("FINDING f/same.bin: every job finds it", flush=True)
    if seed == 2:
        print("FINDING f/x.bin: made up by the fake", flush=True)
    sys.exit(0)
"""


def test_jobs_run_as_children_sharing_the_corpus_and_their_figures_add_up(monkeypatch, tmp_path):
    """--jobs N: N children of the real bootstrap (here with a stand-in atheris), each with
    its own seed and the shared corpus; executions add up, coverage/features/corpus are the
    largest, every child's findings are reported (one that several found, once)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "atheris.py").write_text(_FAKE_ATHERIS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), *sys.path]))
    monkeypatch.setattr(engine, "atheris_available", lambda: True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    echoed: list[str] = []
    report = engine.run_atheris("vmstate", seconds=5, corpus=corpus, findings=tmp_path / "f", jobs=3, seed=1,
                                echo=echoed.append)
    assert report.executions == 1000 + 2000 + 3000
    assert (report.coverage, report.features, report.corpus) == (13, 23, 3)
    assert report.seconds == 3.0  # the longest child's own clock
    assert report.findings == echoed == ["f/same.bin: every job finds it", "f/x.bin: made up by the fake"]
    assert sorted(p.name for p in corpus.iterdir()) == ["from-1", "from-2", "from-3"]


def test_children_run_at_once_and_each_output_is_kept(tmp_path):
    """The children run concurrently (each waits for a file the next one writes)."""
    script = ("import os, sys, time\n"
              "me, d = int(sys.argv[1]), sys.argv[2]\n"
              "open(os.path.join(d, str(me)), 'w').close()\n"
              "deadline = time.monotonic() + 60\n"
              "while not os.path.exists(os.path.join(d, str((me + 1) % 3))) and time.monotonic() < deadline:\n"
              "    time.sleep(0.01)\n"
              "print('child', me, os.path.exists(os.path.join(d, str((me + 1) % 3))))\n")
    outputs, stopped = engine._run_children([[sys.executable, "-c", script, str(i), str(tmp_path)] for i in range(3)])
    assert outputs == ["child 0 True\n", "child 1 True\n", "child 2 True\n"]
    assert stopped is None


def _signal_me_when(ready: Callable[[], bool], signum: int, *, times: int = 1, gap: float = 0.3) -> threading.Thread:
    """Send ``signum`` to this process once ``ready()`` holds (checked every 20 ms, for at
    most 60 s), ``times`` times ``gap`` seconds apart."""
    def send() -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(times):
            if i:
                time.sleep(gap)
            os.kill(os.getpid(), signum)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def _handler_installed(signum: int = signal.SIGTERM) -> Callable[[], bool]:
    return lambda: signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def _markers(d: Path, n: int) -> Callable[[], bool]:
    return lambda: len(list(d.glob("ready-*"))) >= n


_POLITE = ("import os, signal, sys, time\n"
           "def bye(*a):\n"
           "    print('figures of', sys.argv[1], flush=True)\n"
           "    sys.exit(72)\n"
           "signal.signal(signal.SIGTERM, bye)\n"
           "print('ready', flush=True)\n"
           "open(os.path.join(sys.argv[2], 'ready-' + sys.argv[1]), 'w').close()\n"
           "time.sleep(120)\n")
_STUBBORN = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "print('ready', flush=True)\n"
             "open(os.path.join(sys.argv[2], 'ready-' + sys.argv[1]), 'w').close()\n"
             "time.sleep(120)\n")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_children_and_their_figures_are_kept(tmp_path, monkeypatch, signum):
    """SIGTERM or SIGINT to ``pcidev fuzz``: each child gets SIGTERM and its last words are
    kept; one that ignores it is killed after the grace period; none is left running; the
    handlers in place before are back."""
    monkeypatch.setattr(engine, "STOP_GRACE", 1.0)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    pids: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        p = real_popen(*args, **kwargs)
        pids.append(p.pid)
        return p

    monkeypatch.setattr(engine.subprocess, "Popen", popen)
    _signal_me_when(_markers(tmp_path, 3), signum)  # (every child has its handler)
    t0 = time.monotonic()
    outputs, stopped = engine._run_children([[sys.executable, "-c", _POLITE, "a", str(tmp_path)],
                                             [sys.executable, "-c", _STUBBORN, "b", str(tmp_path)],
                                             [sys.executable, "-c", _POLITE, "c", str(tmp_path)]])
    assert stopped == signum
    assert time.monotonic() - t0 < 100  # (not the children's 120 s)
    assert outputs == ["ready\nfigures of a\n", "ready\n", "ready\nfigures of c\n"]
    assert len(pids) == 3 and all(_gone(pid) for pid in pids)  # reaped: no such process any more
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_signal_kills_the_children_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "STOP_GRACE", 300.0)
    _signal_me_when(_markers(tmp_path, 1), signal.SIGTERM, times=2)  # (the child ignores SIGTERM by then)
    t0 = time.monotonic()
    outputs, stopped = engine._run_children([[sys.executable, "-c", _STUBBORN, "a", str(tmp_path)]])
    assert stopped == signal.SIGTERM and outputs == ["ready\n"]
    assert time.monotonic() - t0 < 100  # neither the grace period nor the child's 120 s


def test_a_child_that_cannot_start_takes_the_started_ones_with_it(tmp_path, monkeypatch):
    """The second child's start fails (EMFILE, say): the first, already running, is killed
    and reaped before the error goes up."""
    pids: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        if pids:
            raise OSError(24, "Too many open files")
        p = real_popen(*args, **kwargs)
        pids.append(p.pid)
        return p

    monkeypatch.setattr(engine.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="Too many open files"):
        engine._run_children([[sys.executable, "-c", "import time; time.sleep(120)"]] * 2)
    assert len(pids) == 1 and _gone(pids[0])


def test_a_run_stopped_before_libfuzzer_started_is_reported_not_an_error(monkeypatch, tmp_path):
    """A signal while the children are still importing (no figures yet): the report says the
    run was stopped (0 executions), not "the fuzzer did not run"."""
    monkeypatch.setattr(engine, "atheris_available", lambda: True)
    monkeypatch.setattr(engine, "_run_children",
                        lambda cmds: (["INFO: Instrumenting pcidev.vmstate\n"] * len(cmds), signal.SIGTERM))
    report = engine.run_atheris("vmstate", seconds=60, corpus=None, findings=tmp_path, jobs=2)
    assert report.interrupted == signal.SIGTERM and report.executions == 0 and report.findings == []
    monkeypatch.setattr(engine, "_run_children", lambda cmds: (["INFO: Instrumenting\n"] * len(cmds), None))
    with pytest.raises(engine.PcidevError, match="did not run"):
        engine.run_atheris("vmstate", seconds=60, corpus=None, findings=tmp_path)


def test_the_random_engine_stops_at_a_signal_and_reports(tmp_path):
    target = vmstate_target.VmstateTarget()
    _signal_me_when(_handler_installed(), signal.SIGTERM)
    report = run_random(target, seconds=600, corpus=None, findings=tmp_path, seed=1)
    assert report.interrupted == signal.SIGTERM
    assert report.executions > 0 and report.seconds < 300
    assert "stopped by SIGTERM" in "\n".join(report.lines())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class _Stuck(FuzzTarget):
    """A target whose second input never returns."""

    name = "stuck"
    runs = 0

    def run(self, data: bytes) -> None:
        self.runs += 1
        while self.runs > 1:
            time.sleep(0.01)

    def seeds(self) -> Iterator[bytes]:
        yield b"x"


def test_a_second_signal_interrupts_an_input_that_does_not_return(tmp_path):
    """The random engine looks at the first signal between inputs; an input that never
    returns is interrupted by the second, and the run is still reported."""
    target = _Stuck()
    _signal_me_when(lambda: target.runs > 1, signal.SIGTERM, times=2)
    report = run_random(target, seconds=600, corpus=None, findings=tmp_path, seed=1)
    assert report.interrupted == signal.SIGTERM and report.executions == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (/proc/PID/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signum - 1) & 1)


def test_pcidev_fuzz_stopped_by_sigterm_prints_its_figures(tmp_path):
    """The command line: SIGTERM ends the run, the figures are printed, exit status 128+15."""
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "fuzz", "vmstate", "--engine", "random",
                             "--seconds", "600", "--findings", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # (until the run has its handler: before, SIGTERM ends the process)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in out and "executions:" in out
