"""A sweep whose entries name their own hook point: several layers from one LM pass, from YAML (tiny GPT-2)."""

import json
import textwrap

import pytest
import torch

from lit_sae.train.sweep import SAESweepModule, expand_specs
from tests.data.test_harvest import _save_tiny_lm, write_corpus
from tests.support.faults import finish, fit_subprocess

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized"]


def test_entries_take_hook_point_and_d_in():
    specs = expand_specs([{"name": "a", "hook_point": HOOKS[1]}, {"name": "b", "hook_point": HOOKS[2], "d_in": 8}],
                         None, {"n_latents": 16, "k": 2})
    assert [s.get("hook_point") for s in specs] == HOOKS[1:] and specs[1]["d_in"] == 8
    m = SAESweepModule(32, saes=[{"name": "a", "hook_point": HOOKS[1]}, {"name": "b"}],
                       defaults={"n_latents": 16, "k": 2}, hook_point=HOOKS[0])
    batch = {"acts": torch.zeros(4, 32), f"acts@{HOOKS[1]}": torch.ones(4, 32)}
    assert torch.equal(m.acts_of(batch, "a"), batch[f"acts@{HOOKS[1]}"]) and m.acts_of(batch, "b") is batch["acts"]

    class Data:
        d_ins = {HOOKS[0]: 32}

    with pytest.raises(ValueError, match=r"model.saes\[a\].hook_point: 'blocks.0.hook_resid_post' is not read"):
        m.check_hooks(Data())
    Data.d_ins = {HOOKS[0]: 32, HOOKS[1]: 64}
    with pytest.raises(ValueError, match=r"model.saes\[a\].d_in: .* is 64 wide"):
        m.check_hooks(Data())


@pytest.mark.slow
def test_sweep_over_layers_from_one_lm_pass(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus, lm = write_corpus(tmp_path / "corpus"), _save_tiny_lm("gpt2", tmp_path / "lm")
    run = tmp_path / "run"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_steps: 12
          default_root_dir: {run}
          logger: false
          enable_progress_bar: false
          val_check_interval: 6
          check_val_every_n_epoch: null
          num_sanity_val_steps: 0
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {run}/checkpoints, save_last: true, save_top_k: 0, every_n_train_steps: 6}}
        model:
          defaults: {{n_latents: 64, k: 4, lr: 0.003}}
          saes:
            - {{name: l1, hook_point: {HOOKS[0]}}}
            - {{name: l0, hook_point: {HOOKS[1]}}}
            - {{name: mlp_in, hook_point: {HOOKS[2]}}}
          dead_after_tokens: 2048
          init_tokens: 512
        data:
          class_path: lit_sae.data.lm_stream.LMStreamDataModule
          init_args:
            model: {lm}
            hook_points: [{", ".join(HOOKS)}]
            source: {corpus}
            total_tokens: 6300
            context_length: 64
            batch_size: 8
            val_fraction: 0.1
            test_fraction: 0.1
            batch_size_tokens: 128
            shuffle_buffer_tokens: 512
            val_tokens: 256
        """))
    code, out = finish(fit_subprocess(cfg, command="sweep fit"), timeout=600)
    assert code == 0, out[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b_pre = {n: state[f"members.{n}.sae.b_pre"] for n in ("l1", "l0", "mlp_in")}
    assert not torch.allclose(b_pre["l1"], b_pre["l0"]) and not torch.allclose(b_pre["l0"], b_pre["mlp_in"])
    for name, hook in zip(("l1", "l0", "mlp_in"), HOOKS):
        cfg_json = json.loads((run / "sae" / name / "cfg.json").read_text())
        named = cfg_json.get("hook_name") or cfg_json.get("metadata", {}).get("hook_name")
        assert named == hook and cfg_json["lit_sae"]["hook_point"] == hook  # each export names its own hook point
