from __future__ import annotations

import pytest

from petbreeds.atomic import atomic_directory, atomic_output, atomic_write_json


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("killed")
    assert target.read_text().strip().endswith("}")
    assert '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_directory_replaces_whole(tmp_path):
    target = tmp_path / "raw"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "b.txt").write_text("2")
        raise RuntimeError("cut")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_directory(target) as d:
        (d / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
