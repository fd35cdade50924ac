"""``lit-sae test`` on a finished run needs only the run: ``--ckpt_path <run>/checkpoints/last.ckpt`` or ``--run
<run>`` uses the run's saved config.yaml (shape, data, trainer settings) and writes into the run folder, from any
working directory; a folder that is not a run is named."""

from tests.cli.test_cli_runs import recipe
from tests.support.faults import cli, error_line


def test_test_needs_only_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["fit", "--config", str(recipe(tmp_path)), "--model.n_latents", "48"])[0] == 0
    run = tmp_path / "runs" / "a"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = cli(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert code == 0, err
    saved = (run / "config_test.yaml").read_text()
    assert "n_latents: 48" in saved and (run / "config.yaml").is_file()
    (run / "config_test.yaml").unlink()
    code, err = cli(["test", "--run", str(run), "--trainer.limit_test_batches", "1"])  # overrides still apply
    assert code == 0, err
    assert "limit_test_batches: 1" in (run / "config_test.yaml").read_text()
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written where the command ran
    code, err = cli(["test", "--run", str(elsewhere)])
    assert code == 2 and "--run" in error_line(err) and "config.yaml" in error_line(err)
