"""Through the real ``lit-sae`` entry point: an output folder that cannot be written stops the run before its first
step with one line naming the setting, the folder and the fix; a write that fails at the end of fit (the export)
never takes the trained checkpoint with it."""

import pytest
import torch

from tests.cli.test_cli_runs import recipe
from tests.support.faults import cli, error_line


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("blocked, key, args", [
    ("runs/a/checkpoints", "Checkpoint.dirpath", []),
    ("out", "model.export_dir", ["--model.export_dir", "out/sae"]),
    ("runs", "trainer.default_root_dir", []),
])
def test_unwritable_output_stops_before_the_first_step(work, blocked, key, args):
    (work / blocked).parent.mkdir(parents=True, exist_ok=True)
    (work / blocked).write_text("a file where a folder must go")
    code, err = cli(["fit", "--config", str(recipe(work)), *args])
    line = error_line(err)
    assert code == 2, err
    assert line.startswith("error: ValueError: " + key) and str(work / blocked) in line and "is a file" in line
    assert not list(work.rglob("*.ckpt")) and not _scalars(work)  # no step was computed


def _scalars(folder):
    """Scalar tags in every TensorBoard file under ``folder`` (Lightning's teardown may leave an empty one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for f in folder.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags += acc.Tags()["scalars"]
    return tags


def test_failed_export_at_fit_end_keeps_the_checkpoint(work, monkeypatch):
    from lit_sae.artifacts import export as export_mod

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(export_mod, "export_sae", full_disk)
    code, err = cli(["fit", "--config", str(recipe(work, steps=4))])
    assert code != 0 and "No space left" in err
    state = torch.load(work / "runs" / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4  # the 4 trained steps are kept, resumable and exportable later
    monkeypatch.undo()
    code, err = cli(["export", str(work / "runs" / "a" / "checkpoints" / "last.ckpt"), "--out", str(work / "exported")])  # absolute: undo() also undid the chdir
    assert code == 0, err
