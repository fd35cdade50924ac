"""An abbreviated key is refused like a misspelled one, with a did-you-mean, never silently expanded by argparse's
prefix matching (``--trainer.max_step 2`` used to run as ``--trainer.max_steps 2``): through ``lit-sae fit`` (the
quick check and LightningCLI's own parser) and the plain commands."""

import pytest

from lit_sae.cli.messages import ConfigError
from tests.cli.test_cli_runs import recipe
from tests.support.faults import cli, error_line


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("given, meant", [(["--trainer.max_step", "2"], "trainer.max_steps"),
                                          (["--trainer.max_step=2"], "trainer.max_steps"),
                                          (["--model.n_latent", "64"], "model.n_latents")])
def test_fit_refuses_abbreviated_keys(work, given, meant):
    code, err = cli(["fit", "--config", str(recipe(work)), *given])
    line = error_line(err)
    assert code == 2 and given[0].split("=")[0] in line and f"did you mean {meant!r}" in line, err
    assert not (work / "runs").exists()  # refused before anything ran


def test_lightning_cli_parser_refuses_abbreviated_keys_too(work):
    """The quick check can stand aside (a DataModule outside lit-sae): LightningCLI's parser refuses as well."""
    from lit_sae.cli.trainer import run_lightning

    with pytest.raises(ConfigError, match=r"trainer\.max_step\b.*did you mean 'trainer\.max_steps'"):
        run_lightning(["fit", "--config", str(recipe(work)), "--trainer.max_step", "2"], run=False)


def test_plain_commands_refuse_abbreviated_options(work):
    (work / "x.ckpt").write_bytes(b"")
    code, err = cli(["export", str(work / "x.ckpt"), "--ou", "e"])
    assert code == 2 and "unrecognized arguments: --ou e; did you mean 'out'?" in err
    assert not (work / "e").exists()
    code, err = cli(["export", str(work / "x.ckpt"), "--outt", "e"])  # misspelled: the same kind of answer
    assert code == 2 and "did you mean 'out'?" in err
