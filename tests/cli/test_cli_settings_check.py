"""A setting that cannot take effect in the run as configured is said once, at the start of ``lit-sae fit``: the
quickstart's ``dead_after_tokens`` longer than the whole run (AuxK never switches on), warm-up longer than the run,
validation that never happens, a logging interval longer than the run. A run where every setting can act says none."""

import logging

from tests.cli.test_cli_runs import recipe
from tests.support.faults import cli


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "lit_sae.callbacks.settings_check" and r.levelno == logging.WARNING]


def test_settings_that_cannot_act_are_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="lit_sae")
    # 4 steps x 64 tokens = 256 tokens
    code, err = cli(["fit", "--config", str(recipe(tmp_path)), "--model.dead_after_tokens", "300",
                     "--model.warmup_steps", "10", "--trainer.val_check_interval", "8",
                     "--trainer.log_every_n_steps", "50"])
    assert code == 0, err
    said = _warnings(caplog)
    assert len(said) == 4, said
    dead, warm, val, logs = said
    assert dead.startswith("model.dead_after_tokens=300 is not shorter than this run (4 steps x 64 tokens = 256 "
                           "tokens)") and "AuxK never switches on" in dead
    assert warm.startswith("model.warmup_steps=10 ") and "never reaches model.lr" in warm
    assert val.startswith("validation never runs during this fit: the first check would come at step 8")
    assert logs.startswith("trainer.log_every_n_steps=50 ")


def test_a_run_where_every_setting_acts_says_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="lit_sae")
    code, err = cli(["fit", "--config", str(recipe(tmp_path)), "--model.dead_after_tokens", "128",
                     "--trainer.val_check_interval", "2"])
    assert code == 0, err
    assert _warnings(caplog) == []
