"""TensorBoard opens on the training curves: ``lit-sae fit`` writes a custom-scalars layout with the per-step curves
first, and ``lit-sae test`` with the evaluation report writes its one-point numbers as one text card, not as one
scalar card each (they used to sort above the training curves). Through the CLI; what is written is read back with
TensorBoard's own event reader."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli.test_cli_runs import recipe
from tests.support.faults import cli

PRESET = """\
trainer:
  callbacks+:
    - class_path: lit_sae.callbacks.eval_report.EvalReport
      init_args: {downstream: false, probes: false, ablation: false, explain: false, progress: false}
"""


def _read(run):
    scalars, texts, layouts = set(), set(), 0
    for f in sorted(run.glob("events.out.tfevents*")):
        acc = EventAccumulator(str(f), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        texts |= {t for t in acc.Tags()["tensors"] if "/text_summary" in t}
        layouts += "custom_scalars__config__" in acc.Tags()["tensors"]
    return scalars, texts, layouts


def test_training_curves_first_and_eval_numbers_as_one_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["fit", "--config", str(recipe(tmp_path))])[0] == 0
    run = tmp_path / "runs" / "a"
    (tmp_path / "eval.yaml").write_text(PRESET)
    code, err = cli(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--config", "eval.yaml"])
    assert code == 0, err
    assert (run / "report.json").is_file()  # the preset was applied on top of the run's own config
    scalars, texts, layouts = _read(run)
    assert {"train/loss", "train/nmse", "train/l0", "train/dead_fraction"} <= scalars
    assert not [t for t in scalars if t.startswith("eval/")]  # no one-point eval cards
    assert "eval/numbers/text_summary" in texts and "eval/report/text_summary" in texts
    assert layouts >= 1
