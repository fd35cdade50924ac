"""One folder per run: which checkpoint each command uses, refused when it would
silently use the wrong weights. Unit tests of lit_sae.train.runs; the CLI paths are in tests/cli/test_cli_runs.py."""

import pytest

from lit_sae.train.runs import checkpoint_dir, checkpoints_in, export_dir, features_dir, report_dir, resolve_ckpt_path


def test_layout_is_under_the_root(tmp_path):
    assert checkpoint_dir(tmp_path) == tmp_path / "checkpoints"
    assert export_dir(tmp_path) == tmp_path / "sae"
    assert features_dir(tmp_path) == tmp_path / "features"
    assert report_dir(tmp_path) == tmp_path


def test_last_resolves_inside_the_folder_and_ignores_temporary_files(tmp_path):
    ck = checkpoint_dir(tmp_path)
    ck.mkdir()
    (ck / ".last.ckpt.123.tmp").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match=str(ck)):
        resolve_ckpt_path("test", "last", [ck])
    (ck / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("test", "last", [ck]) == str(ck / "last.ckpt")
    assert [p.name for p in checkpoints_in([ck])] == ["last.ckpt"]


def test_last_without_checkpoint_is_an_error_for_fit_too(tmp_path):
    with pytest.raises(FileNotFoundError, match="omitting --ckpt_path"):
        resolve_ckpt_path("fit", "last", [checkpoint_dir(tmp_path)])


def test_fresh_fit_into_a_used_root_is_refused_with_both_ways_out(tmp_path):
    ck = checkpoint_dir(tmp_path)
    assert resolve_ckpt_path("fit", None, [ck]) is None  # empty root: a fresh start
    ck.mkdir()
    (ck / "epoch=0-step=4.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        resolve_ckpt_path("fit", None, [ck])
    assert "--ckpt_path last" in str(err.value) and "--trainer.default_root_dir" in str(err.value)
    assert "epoch=0-step=4.ckpt" in str(err.value)


def test_requeued_fit_continues_from_lightnings_hpc_checkpoint(tmp_path):
    ck = checkpoint_dir(tmp_path)
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(b"x")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("fit", None, [ck], root=tmp_path) == "hpc"


@pytest.mark.parametrize("command", ["validate", "test", "features"])
def test_evaluation_refuses_untrained_weights_unless_asked(tmp_path, command):
    ck = checkpoint_dir(tmp_path)
    with pytest.raises(ValueError, match=f"none yet in {ck}"):
        resolve_ckpt_path(command, None, [ck])
    assert resolve_ckpt_path(command, None, [ck], untrained=True) is None
    assert resolve_ckpt_path(command, None, [ck], init_from=str(tmp_path / "sae")) is None
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="found .*last.ckpt"):  # an explicit choice is still needed
        resolve_ckpt_path(command, None, [ck])


def test_untrained_is_not_a_fit_option(tmp_path):
    with pytest.raises(ValueError, match="remove --untrained"):
        resolve_ckpt_path("fit", None, [tmp_path], untrained=True)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_ckpt_path("test", str(tmp_path / "nope.ckpt"), [tmp_path])


def test_recipes_keep_everything_under_their_root():
    """A copied recipe with another default_root_dir must be another run: no recipe names a checkpoint or export
    folder of its own."""
    from pathlib import Path

    import yaml

    recipes = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["trainer"].get("default_root_dir"), path.name
        assert (cfg.get("model") or {}).get("export_dir") in (None, "none"), path.name
        for cb in cfg["trainer"].get("callbacks") or []:
            assert "dirpath" not in (cb.get("init_args") or {}), (path.name, cb["class_path"])
