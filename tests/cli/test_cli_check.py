"""The quick command-line check (lit_sae.cli.check): the same keys and types as LightningCLI's parser, rejects what it
rejects before torch / Lightning load, never rejects what it accepts, and stands aside where it cannot judge."""

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import pytest

from lit_sae import compat
from lit_sae.cli import check as cli_check
from lit_sae.cli.errors import ConfigError
from lit_sae.cli.trainer import SAECLI, run_lightning

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))  # sweep*.yaml are checked as sweeps (`lit-sae sweep fit`)
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))


class _Stop(Exception):
    pass


def _real_parser(command: str, model_class=None):
    """LightningCLI's own parser for ``lit-sae <command>`` (SAECLI, stopped right after building it)."""
    captured = {}

    class Capture(SAECLI):
        def parse_arguments(self, parser, args) -> None:
            captured.update(zip(self.subcommands(), compat.subcommand_parsers(parser)))
            raise _Stop

    with pytest.raises(_Stop):
        run_lightning([command], cli_class=Capture, model_class=model_class)
    return captured[command]


def _options(parser) -> dict[str, Any]:
    """dest -> type hint for every option that is not inside the data subclass or a help/print action."""
    out = {}
    for action in parser._actions:
        dest = action.dest
        if not isinstance(dest, str) or dest.startswith("data.") or dest.split(".")[-1] in ("help", "print_config"):
            continue
        out[dest] = getattr(action, "_typehint", None)
    return out


def _loosened(real: Any, standin: Any) -> bool:
    """The stand-in's type is the real one, or the real one with names outside typing/builtins read as Any (or
    made Optional where the default is a module constant)."""
    if standin == real or standin is Any:
        return True
    if get_origin(standin) is Union and type(None) in get_args(standin) and type(None) not in get_args(real or int):
        standin = Optional[get_args(standin)[0]] if len(get_args(standin)) == 2 else standin
        return standin == Optional[real] or _loosened(real, get_args(standin)[0])
    if get_origin(standin) is not None and get_origin(standin) == get_origin(real):
        return len(get_args(standin)) == len(get_args(real)) and all(
            _loosened(r, s) for r, s in zip(get_args(real), get_args(standin)))
    return False


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_standin_parser_has_the_real_keys_and_types(command):
    real, standin = _options(_real_parser(command)), _options(cli_check.build_parser(command))
    assert set(standin) == set(real)
    for key in (k for k in real if k.startswith("model.")):
        assert _loosened(real[key], standin[key]), (key, real[key], standin[key])
    typed = [k for k in real if standin[k] == real[k]]
    assert {"model.n_latents", "model.k", "model.normalize", "trainer.max_steps", "trainer.devices"} <= set(typed)


def test_sweep_standin_has_the_sweep_modules_keys():
    from lit_sae.train.sweep import SAESweepModule

    real = _options(_real_parser("fit", SAESweepModule))
    assert set(_options(cli_check.build_parser("fit", model="sweep"))) == set(real)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("preset", [None, *PRESETS], ids=lambda p: p.name if p else "alone")
def test_every_recipe_and_preset_passes(recipe, preset):
    more = ["--config", str(preset)] if preset else []
    model = "sweep" if recipe.stem.startswith("sweep") else "module"
    for command in ("fit", "test"):
        assert cli_check.check([command, "--config", str(recipe), *more], model=model) is None
    assert cli_check.check(["sweep-is-not-a-command"]) is None


def test_sweep_recipe_passes_as_a_sweep_and_fails_as_a_plain_fit():
    sweep = str(ROOT / "configs" / "sweep.yaml")
    assert cli_check.check(["fit", "--config", sweep], model="sweep") is None
    with pytest.raises(ConfigError, match="model"):
        cli_check.check(["fit", "--config", sweep])


VALID = [
    ["--data.init_args.batch_size_tokens", "8", "--data.num_workers", "1"],
    ["--data", "lit_sae.data.synthetic.SyntheticDataModule", "--data.n_features", "5"],
    ["--trainer.callbacks+=lit_sae.callbacks.histograms.FeatureHistograms", "--trainer.logger", "false"],
    ["--trainer.precision", "bf16-mixed", "--trainer.devices", "2", "--ckpt_path", "last"],
    ["--model.lr", "1e-3", "--model.betas", "[0.9, 0.99]", "--seed_everything", "3", "--untrained", "true"],
]


@pytest.mark.parametrize("args", VALID, ids=lambda a: a[0])
def test_valid_overrides_pass(args):
    assert cli_check.check(["fit", "--config", QUICKSTART, *args]) is None


WRONG = {
    "model key": (["--model.n_latnets", "8"], "did you mean 'model.n_latents'"),
    "trainer key": (["--trainer.max_epohcs", "3"], "did you mean 'trainer.max_epochs'"),
    "top-level key": (["--seed_everyting", "3"], "did you mean 'seed_everything'"),
    "type": (["--model.k", "abc"], 'model.k": Expected a <class \'int\'>'),
    "choice": (["--model.normalize", "l2"], "'none', 'scalar', 'layernorm'"),
    "trainer type": (["--trainer.max_steps", "abc"], 'trainer.max_steps": Expected a <class \'int\'>'),
    "data key": (["--data.init_args.batch_size", "8"],
                 "ActivationDataModule has no argument 'batch_size'; did you mean 'init_args.batch_size_tokens'?"),
    "linked key": (["--model.d_in", "3"], "model.d_in is read from the data"),
    "data class": (["--data.class_path", "no_such_pkg.Data"], "No module named 'no_such_pkg'"),
}


@pytest.mark.parametrize("case", WRONG, ids=str)
def test_wrong_keys_and_values_fail_as_one_line(case):
    args, must = WRONG[case]
    with pytest.raises(ConfigError) as info:
        cli_check.check(["fit", "--config", QUICKSTART, *args])
    message = str(info.value)
    assert must in message and "\n" not in message and "`lit-sae fit --help` lists the options" in message


def test_help_and_print_config_are_left_to_lightningcli(capsys):
    for extra in (["--help"], ["--print_config"], ["--data.help", "ActivationDataModule"], ["-h"]):
        assert cli_check.check(["fit", "--config", QUICKSTART, "--model.bogus", "1", *extra]) is None
    assert capsys.readouterr().out == ""


def test_a_datamodule_outside_lit_sae_is_left_to_lightningcli(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent("""
        import lightning as L

        class MyData(L.LightningDataModule):
            def __init__(self, size: int = 3):
                super().__init__()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = sys.modules.get("lit_sae.data.datamodule")
    args = ["fit", "--config", QUICKSTART, "--data", "my_data.MyData", "--data.size", "4"]
    assert cli_check.check(args) is None
    assert cli_check.check([*args, "--data.sise", "4"]) is None  # cannot judge MyData: LightningCLI will
    assert "my_data" not in sys.modules and sys.modules.get("lit_sae.data.datamodule") is real
    assert not any(isinstance(f, cli_check._StandIns) for f in sys.meta_path)


def test_sources_it_cannot_read_leave_the_command_to_lightningcli(monkeypatch):
    # e.g. another Lightning whose Trainer source does not read as expected: the check stands aside, restores the
    # import machinery, and LightningCLI judges the command (its own one-line error path)
    def unreadable(*args, **kwargs):
        raise TypeError("a signature this check cannot read")

    monkeypatch.setattr(cli_check, "build_parser", unreadable)
    assert cli_check.check(["fit", "--config", QUICKSTART, "--model.bogus", "1"]) is None
    assert not any(isinstance(f, cli_check._StandIns) for f in sys.meta_path)


def test_console_fails_on_a_bad_key_without_importing_torch_or_lightning():
    code = textwrap.dedent(f"""
        import sys
        from lit_sae.cli.main import main
        try:
            main(["fit", "--config", {QUICKSTART!r}, "--model.bogus", "1"])
        except SystemExit as exn:
            print("EXIT", exn.code, "torch" in sys.modules, "lightning" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EXIT 2 False False" in p.stdout, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[0] == ("error: unrecognized arguments: --model.bogus 1 (`lit-sae fit --help` lists the options)")
    assert len(lines) == 2 and "LIT_SAE_TRACEBACK" in lines[1]


def test_unknown_key_in_a_yaml_section_is_named_with_its_section(tmp_path):
    import yaml

    cfg = yaml.safe_load(Path(QUICKSTART).read_text())
    cfg["model"]["n_latnets"] = 32
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"unknown key model\.n_latnets in the config; did you mean 'model\.n_latents'"):
        cli_check.check(["fit", "--config", str(tmp_path / "c.yaml")])
