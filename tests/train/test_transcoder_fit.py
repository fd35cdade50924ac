"""``lit-sae fit`` trains a transcoder from a multi-hook harvest (a tiny random GPT-2's block-1 MLP input and output),
through the real entry point and ActivationDataModule: it learns the target, exports SAELens's transcoder layout
with both hook names, and bad configurations stop with one line naming the key (exit 2) before anything is written."""

import json
import math
from pathlib import Path

import pytest
import torch

from lit_sae.artifacts.load import load_sae, read_checkpoint
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.harvest import run_harvest
from lit_sae.sae.transcoder import Transcoder
from tests.data.test_harvest import _args, _save_tiny_lm, write_corpus
from tests.support.faults import cli, error_line

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"

RECIPE = """\
seed_everything: 0
trainer:
  max_steps: {steps}
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  val_check_interval: {val_every}
  check_val_every_n_epoch: null
model:
  n_latents: 64
  k: 4
  lr: 0.004
  init_tokens: 512
  transcoder: {transcoder}
  skip: {skip}
  activation: {activation}
  normalize: scalar
data:
  class_path: lit_sae.data.datamodule.ActivationDataModule
  init_args:
    path: {shards}
    batch_size_tokens: 128
    num_workers: 0
    {target}
"""

EVAL = """\
trainer:
  callbacks+:
    - class_path: lit_sae.callbacks.eval_report.EvalReport
      init_args:
        n_contexts: 8
        probes: false
        ablation: true
        explain: false
        batch_size: 4
        progress: false
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    model = _save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))
    out = tmp_path_factory.mktemp("multi")
    args = _args(model, corpus, out)
    args.pop("hook_point")
    run_harvest(**args, hook_points=[HOOK_IN, HOOK_OUT])
    return out


def recipe(tmp: Path, shards: Path, root: str, steps=40, transcoder="true", skip="true", activation="batchtopk",
           target=f"target_hook_point: {HOOK_OUT}") -> Path:
    path = tmp / f"{root}.yaml"
    path.write_text(RECIPE.format(steps=steps, root=tmp / root, shards=shards, transcoder=transcoder, skip=skip,
                                  activation=activation, target=target, val_every=min(10, steps)))
    return path


def _test_nmse(sae, shards) -> float:
    dm = ActivationDataModule(str(shards), batch_size_tokens=512, num_workers=0, target_hook_point=HOOK_OUT)
    num = den = 0.0
    ys, preds = [], []
    for batch in dm.test_dataloader():
        x, y = batch["acts"].float(), batch["target"].float()
        preds.append(sae.reconstruct(x).double())
        ys.append(y.double())
    y, pred = torch.cat(ys), torch.cat(preds)
    num = float((pred - y).pow(2).sum())
    den = float((y - y.mean(0)).pow(2).sum())
    return num / den


@pytest.mark.slow
def test_fit_trains_a_skip_transcoder_and_exports_it(tmp_path, shards):
    code, err = cli(["fit", "--config", str(recipe(tmp_path, shards, "run"))])
    assert code == 0, err[-3000:]
    export = tmp_path / "run" / "sae"
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["hook_name"], cfg["hook_name_out"]) == (HOOK_IN, HOOK_OUT)
    sae = load_sae(export)
    assert isinstance(sae, Transcoder) and sae.skip and sae.d_out == sae.d_in == 32
    trained, info = read_checkpoint(next((tmp_path / "run").rglob("*.ckpt")))
    assert isinstance(trained, Transcoder) and info["hparams"]["target_hook_point"] == HOOK_OUT
    nmse = _test_nmse(sae, shards)
    # Untrained, the prediction is b_dec (the target's median): NMSE about 1. Trained 40 steps, far below.
    untrained = _test_nmse(Transcoder(32, 64, 4, skip=True).eval(), shards)
    assert nmse < 0.5 * min(untrained, 1.0), (nmse, untrained)
    # lit-sae test with the evaluation report: the target's NMSE and the downstream loss with the prediction
    # replacing the MLP's output
    preset = tmp_path / "eval.yaml"
    preset.write_text(EVAL)
    code, err = cli(["test", "--config", str(recipe(tmp_path, shards, "run")), "--config", str(preset),
                     "--ckpt_path", "last"])
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # the export holds the same weights in float32, folded: the same NMSE to float32 rounding of the predictions
    assert report["metrics"]["nmse"] == pytest.approx(nmse, rel=1e-4)
    d = report["downstream"]
    assert (d["input_hook_point"], d["hook_point"]) == (HOOK_IN, HOOK_OUT)
    # The splice took place (a prediction left out would give the clean CE bit for bit) and gave a finite loss. Which
    # of the transcoder and zero-ablation lands closer to the clean CE is not a property of this tiny LM: its MLP
    # output moves the CE by ~4e-4 nats, below the run-to-run spread of the 40-step fit across thread counts.
    assert math.isfinite(d["sae_ce"]) and math.isfinite(d["zero_ce"]) and d["sae_ce"] != d["clean_ce"]
    assert "ablation" not in report and report["notes"]
    assert "replacing blocks.1.hook_mlp_out" in (tmp_path / "run" / "report.md").read_text()
    # lit-sae export to circuit-tracer's layout from the checkpoint: the same prediction as the fit's export
    ckpt = str(next((tmp_path / "run").rglob("last.ckpt")))
    code, err = cli(["export", ckpt, "--out", str(tmp_path / "ct"), "--format", "circuit-tracer"])
    assert code == 0, err[-2000:]
    x = torch.randn(64, 32) * 3
    torch.testing.assert_close(load_sae(tmp_path / "ct").reconstruct(x), sae.reconstruct(x), rtol=0,
                               atol=1e-5 * float(sae.reconstruct(x).abs().max()))


def test_topk_transcoder_export_to_their_layouts_is_refused(tmp_path, shards):
    code, err = cli(["fit", "--config", str(recipe(tmp_path, shards, "topk", steps=2, activation="topk"))])
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "topk" / "sae" / "cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    ckpt = str(next((tmp_path / "topk").rglob("last.ckpt")))
    for fmt in ("saelens", "circuit-tracer"):
        code, err = cli(["export", ckpt, "--out", str(tmp_path / fmt), "--format", fmt])
        assert code == 2 and "model.activation='topk'" in error_line(err), err[-2000:]
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("kw,key", [
    ({"transcoder": "false", "skip": "true", "target": ""}, "model.skip"),
    ({"target": ""}, "model.transcoder"),
    ({"transcoder": "false", "skip": "false"}, "data.target_hook_point"),
    ({"target": "target_hook_point: blocks.2.hook_mlp_out"}, "data.target_hook_point"),
])
def test_bad_transcoder_configs_stop_with_the_key_and_write_nothing(tmp_path, shards, kw, key):
    code, err = cli(["fit", "--config", str(recipe(tmp_path, shards, "bad", steps=2, **kw))])
    line = error_line(err)
    assert code == 2 and key in line, (code, err[-2000:])
    assert not list((tmp_path / "bad").rglob("*.ckpt")) and not (tmp_path / "bad" / "sae").exists()
