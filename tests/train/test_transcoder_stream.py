"""``lit-sae fit`` trains a skip-transcoder from LMStreamDataModule (a tiny random GPT-2's block-1 MLP input ->
output, streamed from the LM while training, no harvest), through the real entry point: it exits 0, logs the target's
train/nmse, and exports SAELens's transcoder layout with both hook names."""

import csv
import json
import textwrap

from lit_sae.artifacts.load import load_sae
from lit_sae.sae.transcoder import Transcoder
from tests.data.test_harvest import _save_tiny_lm, write_corpus
from tests.support.faults import cli

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def test_fit_trains_a_skip_transcoder_from_the_stream(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus, lm = write_corpus(tmp_path / "corpus"), _save_tiny_lm("gpt2", tmp_path / "lm")
    run = tmp_path / "run"
    config = tmp_path / "transcoder-stream.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_steps: 6
          default_root_dir: {run}
          enable_progress_bar: false
          enable_model_summary: false
          log_every_n_steps: 1
          val_check_interval: 3
          check_val_every_n_epoch: null
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args:
              save_dir: {run}
              name: csv
              version: 0
        model:
          transcoder: true
          skip: true
          activation: batchtopk
          n_latents: 64
          k: 4
          lr: 0.004
          init_tokens: 512
          normalize: scalar
        data:
          class_path: lit_sae.data.lm_stream.LMStreamDataModule
          init_args:
            model: {lm}
            hook_point: {HOOK_IN}
            target_hook_point: {HOOK_OUT}
            source: {corpus}
            total_tokens: 6300
            context_length: 64
            batch_size: 8
            val_fraction: 0.1
            test_fraction: 0.1
            seed: 3
            batch_size_tokens: 128
            shuffle_buffer_tokens: 1024
            num_workers: 0
            val_tokens: 256
        """))
    code, err = cli(["fit", "--config", str(config)])
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    nmse = [float(r["train/nmse"]) for r in rows if r.get("train/nmse")]
    assert len(nmse) >= 5 and all(v == v for v in nmse), nmse  # logged every step, finite
    assert any(r.get("val/nmse") for r in rows)
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert (cfg["hook_name"], cfg["hook_name_out"]) == (HOOK_IN, HOOK_OUT)
    sae = load_sae(run / "sae")
    assert isinstance(sae, Transcoder) and sae.skip and sae.d_in == sae.d_out == 32
