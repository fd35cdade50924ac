"""Files lit-sae writes through a temporary name never follow a link planted at the name it used to predict
(``<name>.tmp``, ``.<name>.<pid>.tmp``, ``.json.tmp``): the temporary file is created exclusively under an
unpredictable name (``lit_sae.fsync.atomic_write``), the link and its target are left alone, the final file is whole
and follows the umask."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sae.data.manifest import write_manifest_atomic
from lit_sae.data.writer import ShardWriter
from lit_sae.eval.report import write_report
from lit_sae.fsync import atomic_write
from lit_sae.train.atomic_io import AtomicCheckpointIO
from lit_sae.train.sweep_table import write_test_table

VICTIM = b"someone else's file\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside the output folder, which a planted link points to."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    return path


def _plant(folder, names, victim):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(victim)


def _untouched(folder, names, victim):
    assert victim.read_bytes() == VICTIM
    for name in names:
        assert (folder / name).is_symlink()  # still the planted link, not replaced or written through
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") and p.name not in names]
    assert left == []  # no temporary file left behind


def test_atomic_write_is_exclusive_and_follows_umask(tmp_path, victim):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        with atomic_write(out / "a.json", "w", encoding="utf-8") as f:
            assert not os.path.islink(f.name) and os.path.basename(f.name).startswith(".a.json.")
            f.write("{}")
    except FileNotFoundError:
        out.mkdir()
        with atomic_write(out / "a.json", "w", encoding="utf-8") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "a.json").stat().st_mode) == 0o640
    with pytest.raises(RuntimeError):
        with atomic_write(out / "a.json", "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert (out / "a.json").read_text() == "{}"  # the earlier file is intact, no temporary file remains
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]


def test_checkpoint_save_ignores_planted_link(tmp_path, victim):
    ck = tmp_path / "run" / "checkpoints"
    names = [f".last.ckpt.{os.getpid()}.tmp", ".last.ckpt.tmp", "last.ckpt.tmp"]
    _plant(ck, names, victim)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, ck / "last.ckpt")
    assert torch.load(ck / "last.ckpt", weights_only=True)["global_step"] == 5
    _untouched(ck, names, victim)


def test_shards_and_manifest_ignore_planted_links(tmp_path, victim):
    out = tmp_path / "shards"
    names = ["train-000000.tar.tmp", "manifest.json.tmp", ".manifest.json.tmp"]
    _plant(out, names, victim)
    w = ShardWriter(str(out), "train", d_in=4, dtype="float16", block_tokens=8, tokens_per_shard=8)
    n = np.arange(8)
    w.add(np.ones((8, 4), np.float32), n, n, n)
    info = w.close()
    assert (out / "train-000000.tar").stat().st_size > 0 and info[0]["tokens"] == 8
    write_manifest_atomic(str(out), {"format": "test"})
    assert json.loads((out / "manifest.json").read_text()) == {"format": "test"}
    _untouched(out, names, victim)


def test_reports_ignore_planted_links(tmp_path, victim):
    out = tmp_path / "report"
    names = ["report.json.tmp", "report.md.tmp", "sweep_test.json.tmp", "sweep_test.md.tmp"]
    _plant(out, names, victim)
    write_report(out, {"metrics": {"nmse": 0.5}})
    assert json.loads((out / "report.json").read_text())["metrics"] == {"nmse": 0.5}
    write_test_table(out, [{"name": "a", "nmse": 0.5}])
    assert (out / "sweep_test.md").is_file()
    _untouched(out, names, victim)


def test_check_writable_probes_the_folder_or_its_nearest_ancestor(tmp_path):
    from lit_sae.fsync import check_writable

    check_writable(tmp_path / "new" / "deeper", "model.export_dir")  # not created, its ancestor is writable
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # the probe left nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out_dir: .*file/sub cannot be created: .*file is a file, not a folder"):
        check_writable(tmp_path / "file" / "sub", "--out_dir")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: the permission bits cannot make a folder unwritable here
        check_writable(locked, "trainer.default_root_dir")
    else:
        with pytest.raises(ValueError, match=r"^trainer.default_root_dir: cannot write in .*locked"):
            check_writable(locked / "run", "trainer.default_root_dir")
    proc = Path("/proc/self")  # Linux: not writable by anyone, root included
    if proc.is_dir():
        with pytest.raises(ValueError, match=r"^trainer.default_root_dir: cannot write in /proc/self .*set "
                                             r"trainer.default_root_dir to a writable folder"):
            check_writable(proc / "run", "trainer.default_root_dir")
