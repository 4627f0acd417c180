"""pcidev.inheritance: descriptors a handover's new process takes instead of opening paths."""

from __future__ import annotations

import os

import pytest

from pcidev.errors import ConfigError
from pcidev.inheritance import format_inherit_arg, image_key, inheriting, parse_inherit_arg, take_inherited


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_keys_name_the_absolute_path_and_the_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert image_key("d.img", read_only=False) == f"image:rw:{tmp_path}/d.img"
    assert image_key(str(tmp_path / "d.img"), read_only=True) == f"image:ro:{tmp_path}/d.img"
    assert image_key("d.img", read_only=False, direct=True) == f"image:rw+direct:{tmp_path}/d.img"


def test_nothing_is_inherited_outside_a_handover():
    assert take_inherited(image_key("/x.img", read_only=False)) is None


def test_every_taker_gets_its_own_duplicate_and_the_offer_is_closed_at_the_end(tmp_path):
    a = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(a, True)
    with inheriting({"k:a": a}):
        assert not os.get_inheritable(a)  # the new process's own children do not get it
        one, two = take_inherited("k:a"), take_inherited("k:a")  # two namespaces on one image
        assert one is not None and two is not None and len({one, two, a}) == 3
        assert os.path.sameopenfile(one, a) and os.path.sameopenfile(two, a)
        assert take_inherited("k:other") is None
    assert take_inherited("k:a") is None  # the context ended
    assert not _is_open(a) and _is_open(one) and _is_open(two)  # the takers own theirs
    os.close(one)
    os.close(two)


def test_a_descriptor_nobody_took_refuses_the_build(tmp_path):
    a, b = os.open(tmp_path, os.O_RDONLY), os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(ConfigError, match="did not take the descriptor.*k:b: it would serve another file"):
        with inheriting({"k:a": a, "k:b": b}):
            os.close(take_inherited("k:a"))
    assert not _is_open(a) and not _is_open(b)


def test_a_build_that_fails_keeps_its_own_error_and_closes_the_offer(tmp_path):
    a = os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(RuntimeError, match="the build failed"), inheriting({"k:a": a}):
        raise RuntimeError("the build failed")
    assert not _is_open(a)


def test_arguments_round_trip_and_bad_ones_are_one_line(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        key = "image:rw:/odd:path=with,commas"
        assert parse_inherit_arg([format_inherit_arg(key, fd)]) == {key: fd}
        for bad in ("x", f"{fd}", f"{fd}:", "2:image:rw:/a", "-5:k", "a1:k"):
            with pytest.raises(ValueError, match="expected FD:KEY"):
                parse_inherit_arg([bad])
        with pytest.raises(ValueError, match="given twice"):
            parse_inherit_arg([f"{fd}:k", f"{fd}:k2"])
        with pytest.raises(ValueError, match="not open"):
            parse_inherit_arg(["999999:k"])
        with pytest.raises(ValueError, match="is the handover channel"):
            parse_inherit_arg([f"{fd}:k"], reserved=(fd,))
    finally:
        os.close(fd)
