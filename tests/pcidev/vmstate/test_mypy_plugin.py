"""pcidev.vmstate.mypy_plugin: mypy reads the field types that take a length as the values they hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SAMPLE = '''
from pcidev.vmstate import U8, Array, Bytes, Str, VarArray, VarBytes

N = 4


def fields(a: Bytes[4], b: VarBytes[N * 2], c: Str[N], d: Array[U8, 3],
           e: VarArray[Array[Str[2] | None, 2], N]) -> None:
    reveal_type(a)
    reveal_type(b)
    reveal_type(c)
    reveal_type(d)
    reveal_type(e)


def wrong_arity(x: VarArray[int], y: Str) -> None:
    pass


def wrong_value(z: VarBytes[8]) -> int:
    return z
'''


def test_mypy_reads_vmstate_types_as_their_values(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(SAMPLE)
    # the project's configuration (pyproject.toml) enables the plugin
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(sample)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith(str(sample))]
    assert out == [
        'note: Revealed type is "bytes"',
        'note: Revealed type is "bytes"',
        'note: Revealed type is "str"',
        'note: Revealed type is "tuple[int, ...]"',
        'note: Revealed type is "tuple[tuple[str | None, ...], ...]"',
        "error: use VarArray[element_type, length]  [misc]",
        "error: use Str[length]  [misc]",
        'error: Incompatible return value type (got "bytes", expected "int")  [return-value]',
    ], r.stdout + r.stderr
