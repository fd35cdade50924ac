"""A checkpoint as ``lit-sae fit`` of release 0.1.0 wrote it (its hyperparameters and state keys, literally) still
resumes (the config checks pass; a changed SAE setting is refused, named) and still exports."""

import pytest
import torch

from lit_sae.artifacts.load import load_sae, read_checkpoint
from lit_sae.cli.main import main
from lit_sae.train.module import SAEModule

# hyper_parameters of a 0.1.0 checkpoint (configs/synthetic.yaml at a small size), as saved by save_hyperparameters
RELEASE_HPARAMS = {
    "n_latents": 64, "k": 8, "k_aux": None, "auxk_coef": 0.03125, "multi_topk": False, "activation": "topk",
    "sparsity_coef": None, "sparsity_warmup_steps": None, "jumprelu_bandwidth": None, "jumprelu_init_threshold": None,
    "jumprelu_threshold_lr_scale": None, "matryoshka_prefixes": None, "normalize": "none", "encoder_init_norm": 0.5,
    "fast": True, "lr": 0.001, "betas": [0.9, 0.999], "eps": 6.25e-10, "warmup_steps": 0, "decay_start": None,
    "ema_decay": 0.9, "dead_after_tokens": 200000, "init_tokens": 32768, "export_dir": None, "init_from": None,
    "lm_name": "synthetic", "d_in": 16, "hook_point": None,
}
RELEASE_STATE_KEYS = {
    "ema.shadow_W_dec", "ema.shadow_W_enc", "ema.shadow_b_enc", "ema.shadow_b_pre", "ema.steps", "sae.W_dec",
    "sae.W_enc", "sae.b_enc", "sae.b_pre", "sae.data_initialized", "sae.norm_scale", "sae.threshold", "tokens_seen",
    "tokens_since_fired",
}
EMA_STEPS = 3


@pytest.fixture
def release_ckpt(tmp_path):
    """The checkpoint file, and the weights its EMA holds (the ones an export must contain)."""
    torch.manual_seed(0)
    module = SAEModule(**RELEASE_HPARAMS)
    state = module.state_dict()
    assert set(state) == RELEASE_STATE_KEYS  # the state a 0.1.0 checkpoint holds: nothing renamed
    weights = {name: torch.randn_like(state[f"sae.{name}"]) for name in ("W_enc", "b_enc", "b_pre")}
    weights["W_dec"] = torch.nn.functional.normalize(torch.randn_like(state["sae.W_dec"]), dim=1)
    debias = 1.0 - RELEASE_HPARAMS["ema_decay"] ** EMA_STEPS  # the EMA's shadows are stored biased (Adam-style)
    for name, value in weights.items():
        state[f"ema.shadow_{name}"] = value * debias
    state["ema.steps"] = torch.tensor(EMA_STEPS)
    state["sae.data_initialized"] = torch.tensor(True)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(RELEASE_HPARAMS), "global_step": 6, "epoch": 0,
                "optimizer_states": [{"param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 6.25e-10}]}]},
               path)
    return path, weights


def test_a_release_checkpoint_reads_and_exports(release_ckpt, tmp_path):
    path, weights = release_ckpt
    sae, info = read_checkpoint(path)
    assert info["global_step"] == 6 and info["ema_steps"] == EMA_STEPS
    given = {k: v for k, v in RELEASE_HPARAMS.items() if k in sae.config() and v is not None}
    assert {k: sae.config()[k] for k in given} == given and sae.k_aux == RELEASE_HPARAMS["d_in"] // 2
    # float32 debiasing: one multiply and one divide, so a few ulp of values of order 1
    for name, value in weights.items():
        torch.testing.assert_close(getattr(sae, name).detach(), value, rtol=1e-6, atol=1e-6)
    main(["export", str(path), "--out", str(tmp_path / "export")])
    exported = load_sae(tmp_path / "export")
    x = torch.randn(32, RELEASE_HPARAMS["d_in"])
    torch.testing.assert_close(exported(x).x_hat, sae(x).x_hat, rtol=1e-5, atol=1e-5)


def test_a_release_checkpoint_resumes_and_a_changed_setting_is_refused(release_ckpt):
    path, _ = release_ckpt
    SAEModule(**RELEASE_HPARAMS).on_load_checkpoint(torch.load(path, weights_only=True))
    changed = SAEModule(**{**RELEASE_HPARAMS, "k": 4})
    with pytest.raises(ValueError, match=r"model\.k: checkpoint 8, config 4"):
        changed.on_load_checkpoint(torch.load(path, weights_only=True))
