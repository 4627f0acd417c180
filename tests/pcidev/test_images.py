"""pcidev.images.create_image: atomic, never overwrites, one winner among racers."""

from __future__ import annotations

import os
import threading

import pytest

from pcidev.errors import ConfigError
from pcidev.images import create_image


def test_racers_get_one_complete_image_and_nothing_is_left_behind(tmp_path):
    path = str(tmp_path / "disk.img")
    for _ in range(30):
        if os.path.exists(path):
            os.unlink(path)
        got: list[int | None] = []
        barrier = threading.Barrier(4)

        def make(box=got, b=barrier):
            b.wait()
            box.append(create_image(path, 1 << 20))

        threads = [threading.Thread(target=make) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [fd for fd in got if fd is not None]
        assert len(winners) == 1 and os.fstat(winners[0]).st_size == 1 << 20
        assert os.fstat(winners[0]).st_ino == os.stat(path).st_ino
        os.close(winners[0])
    assert os.listdir(tmp_path) == ["disk.img"]


def test_an_existing_file_is_never_touched(tmp_path):
    path = tmp_path / "mine.img"
    path.write_bytes(b"user data")
    assert create_image(str(path), 1 << 20) is None
    assert path.read_bytes() == b"user data"
    with pytest.raises(ConfigError, match="cannot create image"):
        create_image(str(tmp_path / "missing-dir" / "x.img"), 4096)
