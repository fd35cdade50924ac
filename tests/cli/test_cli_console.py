"""Through the real console script: every command in ``lit-sae --help``, lit-sae's own
options first in ``fit --help``, one-line errors (exit 2) for every kind of misconfiguration, a quiet console."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.faults import cli

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

ROOT = Path(__file__).resolve().parents[2]
LIT_SAE = str(Path(sys.executable).with_name("lit-sae"))
SYNTHETIC = str(ROOT / "configs" / "synthetic.yaml")


def test_top_level_help_lists_every_command_without_importing_lightning():
    code = ("import sys\nfrom lit_sae.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LIGHTNING-LOADED' if 'lightning' in sys.modules else 'LIGHTNING-NOT-LOADED')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    table = out.split("Commands")[1].split("options:")[0]
    named = [line.split()[0] for line in table.splitlines()[1:] if line.strip()]
    assert named == ["harvest", "fit", "validate", "test", "sweep", "export", "features", "explain", "reproduce"]
    assert all(len(line.split(None, 1)) == 2 for line in table.splitlines()[1:] if line.strip())  # one line each
    assert "LIGHTNING-NOT-LOADED" in out


def test_fit_help_shows_model_and_data_before_the_trainer():
    out = subprocess.run([LIT_SAE, "fit", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.index("--model.n_latents") < out.index("--data ") < out.index("--trainer.max_steps")
    assert "--untrained" in out


MISCONFIGURED = {
    "accelerator": (["--trainer.accelerator", "gpu"], "accelerator, devices, precision"),
    "devices": (["--trainer.devices", "0"], "devices"),
    "precision": (["--trainer.precision", "64x"], "valid: 64, 32, 16"),
    "strategy": (["--trainer.strategy", "nope"], "strategy"),
    "type": (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    "key": (["--model.n_latnets", "8"], "did you mean 'model.n_latents'"),
    "value": (["--model.k", "0"], "model.k=0"),
    "config path": (["--config", "/no/such/recipe.yaml"], "/no/such/recipe.yaml"),
    "root is a file": (["--trainer.default_root_dir", SYNTHETIC], "is a file"),
}


@pytest.mark.parametrize("case", MISCONFIGURED, ids=str)
def test_misconfiguration_is_one_line_exit_2(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, must = MISCONFIGURED[case]
    code, err = cli(["fit", "--config", SYNTHETIC, "--trainer.max_steps", "2", *args])
    lines = [ln for ln in err.splitlines() if ln.strip() and "LIT_SAE_TRACEBACK" not in ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and must in lines[0], err
    assert "Traceback" not in err


def test_console_is_quiet_and_names_a_substituted_precision(tmp_path):
    p = subprocess.run([LIT_SAE, "fit", "--config", SYNTHETIC, "--trainer.max_steps", "3",
                        "--data.init_args.train_tokens", "4096", "--trainer.precision", "16-mixed",
                        "--trainer.default_root_dir", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-2000:]
    for noise in ("litlogger", "LeafSpec", "v_num", "IterableDataset", "AMP with fp16 is not supported"):
        assert noise not in text, noise
    assert "trainer.precision=16-mixed is not available here: Lightning runs with bf16-mixed" in text
    assert text.count("Seed set to 0") == 1  # no line printed twice


def test_feature_recovery_logs_best_cosine_by_hand(tmp_path):
    import lightning as L

    from lit_sae.callbacks.recovery import FeatureRecovery
    from lit_sae.data.synthetic import SyntheticDataModule
    from lit_sae.train.module import SAEModule

    L.seed_everything(0)
    dm = SyntheticDataModule(d_in=16, n_features=32, active=2, batch_size_tokens=128, train_tokens=128 * 20,
                             val_tokens=256)
    module = SAEModule(d_in=16, n_latents=64, k=2, lr=3e-3, export_dir="none", init_tokens=256)
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[FeatureRecovery()], num_sanity_val_steps=0)
    trainer.fit(module, dm)
    true = dm.directions.double() / dm.directions.double().norm(dim=1, keepdim=True)
    dec = module.sae.W_dec.detach().double()
    expected = float((true @ (dec / dec.norm(dim=1, keepdim=True)).T).max(dim=1).values.mean())
    assert float(trainer.callback_metrics["val/best_cosine"]) == pytest.approx(expected, abs=1e-5)
    assert 0.3 < expected < 1.0


def test_command_table_lines_are_the_functions_docstrings():
    """`lit-sae --help` shows each command's line without importing it: the line must be its docstring's first."""
    from lit_sae.cli.commands import TOOLS, tool

    for name, (_, _, line) in TOOLS.items():
        assert (tool(name).__doc__ or "").strip().splitlines()[0].replace("``", "") == line, name
