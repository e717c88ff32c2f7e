"""Outputs appear only when complete: a failed write leaves the old file and no debris."""

import numpy as np
import pytest

from DiffDenoiseLib.atomic import replaced_when_done


def test_target_appears_when_the_block_finishes_and_keeps_its_suffix(tmp_path):
    target = tmp_path / "targets.npz"
    with replaced_when_done(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp.name.startswith(".")
        np.savez(tmp, v0=np.arange(3))
        assert not target.exists()
    assert np.load(target)["v0"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["targets.npz"]


def test_failed_write_keeps_the_previous_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="interrupted"):
        with replaced_when_done(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
