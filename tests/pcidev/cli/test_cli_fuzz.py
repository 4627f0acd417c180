"""``pcidev fuzz``: the list of targets, a short run of the random engine, and one clear
error line without the fuzz extra or for an unknown target."""

from __future__ import annotations

from pcidev.cli import main
from pcidev.testing.fuzz import engine


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_list_names_every_target_with_its_invariants(capsys):
    status, out, _ = _run(capsys, "fuzz", "--list")
    assert status == 0
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert {"nvme-guest", "vfio-user", "vmstate", "link", "migration"} <= set(names)
    assert out.count("invariants:") == len(names)


def test_random_engine_run_prints_the_figures(capsys, tmp_path):
    status, out, _ = _run(capsys, "fuzz", "vmstate", "--engine", "random", "--seconds", "0.5",
                          "--findings", str(tmp_path), "--seed", "3")
    assert status == 0, out
    executions = next(line for line in out.splitlines() if line.startswith("executions:"))
    assert int(executions.split()[1]) >= 10 and "exec/s" in executions
    assert "coverage:    n/a" in out and "findings:    0" in out


def test_without_atheris_one_line_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "atheris_available", lambda: False)
    status, out, err = _run(capsys, "fuzz", "vmstate", "--seconds", "1", "--findings", str(tmp_path))
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "pip install 'pcidev[fuzz]'" in err and "Traceback" not in err


def test_an_unknown_target_is_one_line(capsys, tmp_path):
    status, _out, err = _run(capsys, "fuzz", "nope", "--engine", "random", "--findings", str(tmp_path))
    assert status == 1 and err.count("\n") == 1 and "no fuzz target 'nope'" in err


def test_bad_numbers_are_usage_errors(capsys):
    assert _run(capsys, "fuzz", "vmstate", "--seconds", "0")[0] == 2
    assert _run(capsys, "fuzz", "vmstate", "--jobs", "0")[0] == 2
    assert _run(capsys, "fuzz", "vmstate", "--jobs", "65")[0] == 2
    assert _run(capsys, "fuzz", "vmstate", "--engine", "random", "--jobs", "2")[0] == 2


def test_endless_or_empty_runs_and_a_missing_corpus_are_usage_errors(capsys, tmp_path):
    for seconds in ("inf", "nan", "1e9"):
        status, _out, err = _run(capsys, "fuzz", "vmstate", "--engine", "random", "--seconds", seconds)
        assert status == 2 and "--seconds" in err and "Traceback" not in err
    status, _out, err = _run(capsys, "fuzz", "vmstate", "--engine", "random", "--seconds", "1",
                             "--corpus", str(tmp_path / "missing"))
    assert status == 2 and "not a directory" in err
