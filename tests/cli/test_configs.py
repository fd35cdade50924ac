"""Every recipe in configs/ and every preset in callbacks/ parses, so none can rot."""

from pathlib import Path

import pytest
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from lit_sae.cli.main import SAECLI, run_lightning

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "configs").glob("sweep*.yaml"))  # `lit-sae sweep fit`: SAESweepModule recipes
RECIPES = sorted(set((ROOT / "configs").glob("*.yaml")) - set(SWEEPS))
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
HARVESTS = sorted((ROOT / "configs" / "harvest").glob("*.yaml"))


class ParseOnly(SAECLI):
    """Parses and type-checks a config without building the data (whose shards may not exist here)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*configs: Path, **kwargs):
    args = [a for c in configs for a in ("--config", str(c))]
    return run_lightning(args, cli_class=ParseOnly, run=False, **kwargs).config


def test_there_are_recipes_and_presets():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "gpt2-small-paper.yaml", "synthetic.yaml"}
    assert PRESETS and HARVESTS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path):
    cfg = parse(path)
    assert cfg.model.k > 0 and cfg.model.n_latents >= cfg.model.k
    assert cfg.data.class_path.startswith("lit_sae.")


@pytest.mark.parametrize("path", RECIPES + SWEEPS, ids=lambda p: p.name)
def test_recipe_validates_every_n_steps(path):
    """Curves in short runs: validation every N steps counted across epochs (an int interval with
    check_val_every_n_epoch null), often enough for several points in the run, not only at each epoch's end."""
    trainer = yaml.safe_load(path.read_text())["trainer"]
    interval = trainer.get("val_check_interval")
    assert isinstance(interval, int) and interval > 0 and trainer.get("check_val_every_n_epoch", 1) is None
    if trainer.get("max_steps"):
        assert trainer["max_steps"] // interval >= 2


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_recipe_parses_and_expands(path):
    from lit_sae.train.sweep import SAESweepModule, expand_specs

    cfg = parse(path, model_class=SAESweepModule)
    specs = expand_specs(cfg.model.saes, cfg.model.grid, {"n_latents": 16384, "k": 32, **(cfg.model.defaults or {})})
    assert len(specs) >= 2 and cfg.data.class_path.startswith("lit_sae.")
    d_in = getattr(cfg.data.init_args, "d_in", None) or (cfg.model.defaults or {}).get("d_in")  # an LM stream's
    # width comes from the LM: such a recipe states it in model.defaults
    SAESweepModule(d_in, saes=cfg.model.saes, grid=cfg.model.grid, defaults=cfg.model.defaults)


def test_paper_recipe_has_the_papers_numbers():
    cfg = parse(ROOT / "configs" / "gpt2-small-paper.yaml")
    assert (cfg.model.n_latents, cfg.model.k, cfg.data.init_args.batch_size_tokens) == (32768, 32, 131072)
    assert cfg.model.auxk_coef == pytest.approx(1 / 32) and cfg.model.dead_after_tokens == 10_000_000


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_callback_preset_adds_to_a_recipe(path):
    base = parse(ROOT / "configs" / "quickstart.yaml")
    cfg = parse(ROOT / "configs" / "quickstart.yaml", path)
    assert len(cfg.trainer.callbacks) == len(base.trainer.callbacks) + 1  # appended, nothing replaced


@pytest.mark.parametrize("path", HARVESTS, ids=lambda p: p.name)
def test_harvest_config_parses(path):
    from lit_sae.data.harvest import run_harvest

    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_harvest)
    cfg = parser.parse_args(["--config", str(path)])
    assert cfg.hook_point.startswith("blocks.") and cfg.total_tokens > 0
