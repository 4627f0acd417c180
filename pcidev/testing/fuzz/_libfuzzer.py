"""The child process of the coverage-guided engine.

:func:`pcidev.testing.fuzz.engine.run_atheris` starts ``python -c`` with
:data:`BOOTSTRAP` and ``TARGET FINDINGS [-p SPEC]... [-i PACKAGE]... [-x MODULE]... -- LIBFUZZER-ARGS``: the
bootstrap imports atheris, then imports this module and loads the plugins and the target
*inside* ``atheris.instrument_imports()`` restricted to the ``-i`` packages less the ``-x``
modules (the target's :attr:`~pcidev.testing.fuzz.FuzzTarget.instrument`, as
:func:`~pcidev.testing.fuzz.engine.instrumentation_args` spells it) or, without any, to pcidev
and the packages of the ``pcidev`` entry points (the plugins), so that they are
instrumented for coverage as they load (instrumenting every loaded module afterwards
takes minutes on a shared machine); what is outside runs uninstrumented, at full speed.
:func:`fuzz` then hands libFuzzer a one-input function that records findings
(``FINDING <line>`` on standard output) and keeps fuzzing; libFuzzer ends the
process.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import atheris  # the optional extra (pcidev[fuzz]): this module runs only in the engine's child

from pcidev.plugins import load_registry, make_plugin_manager, parse_plugin_specs
from pcidev.testing.fuzz.catalogue import make_target
from pcidev.testing.fuzz.engine import FindingLog, run_one
from pcidev.testing.fuzz.target import FuzzTarget, RssWatch

__all__ = ["BOOTSTRAP", "fuzz", "prepare"]

#: What the child runs (``python -c BOOTSTRAP ARGS...``).
BOOTSTRAP = """
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


def prepare(argv: list[str]) -> tuple[FuzzTarget, FindingLog, list[str]]:
    """Load the plugins as ``pcidev -p`` does and set the target up.

    :param argv: ``TARGET FINDINGS [-p SPEC]... [-i PACKAGE]... [-x MODULE]... -- LIBFUZZER-ARGS``
        (``-i`` and ``-x`` are the bootstrap's; options come in pairs, in any order).
    :returns: the target, its finding log and libFuzzer's arguments.
    :raises SystemExit: on a usage error.
    """
    if "--" not in argv or argv.index("--") < 2:
        raise SystemExit("usage: TARGET FINDINGS [-p SPEC]... [-i PACKAGE]... [-x MODULE]... -- LIBFUZZER-ARGS")
    split = argv.index("--")
    name, findings, rest = argv[0], Path(argv[1]), argv[2:split]
    specs = [rest[i + 1] for i in range(0, len(rest) - 1, 2) if rest[i] == "-p"]
    blocked, extra = parse_plugin_specs(specs)
    registry = load_registry(make_plugin_manager(blocked=blocked, plugins=extra))
    target = make_target(registry, name)
    target.setup()
    for _ in target.seeds():  # the seed builders' imports happen here, instrumented
        break
    return target, FindingLog(findings, target.name), argv[split + 1:]


def fuzz(target: FuzzTarget, log: FindingLog, libfuzzer_args: list[str]) -> None:
    """Run libFuzzer on ``target`` (it ends the process).

    :param target: the target, set up.
    :param log: where findings are saved.
    :param libfuzzer_args: libFuzzer's options and corpus directories.
    """
    logging.disable(logging.WARNING)  # a refusal's warning is the expected outcome; errors still show

    rss = RssWatch()

    def one_input(data: bytes) -> None:
        line = run_one(target, data, log, rss)
        if line:
            print(f"FINDING {line}", flush=True)

    # SIGINT as SIGTERM: libFuzzer's own handler (it prints its figures and exits), not
    # Python's KeyboardInterrupt inside an input (a Ctrl-C reaches every child of the group)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()
