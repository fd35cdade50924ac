"""Every architecture through plain `lit-sae fit` (recipes configs/{relu,jumprelu,matryoshka,batchtopk}.yaml): a few
steps on synthetic data with the checkpoint and export path of TopK; exact resume after kill -9 for JumpReLU; bad
input stops with a one-line error naming the key."""

from pathlib import Path

import pytest
import torch

from lit_sae.artifacts.load import load_sae, read_checkpoint
from lit_sae.train.module import SAEModule
from tests.support import faults

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.logger", "false", "--model.n_latents", "128", "--model.init_tokens", "1024",
         "--data.init_args.batch_size_tokens", "256", "--data.init_args.train_tokens", "4096",
         "--data.init_args.val_tokens", "512"]
EXPORTED_AS = {"relu": "relu", "jumprelu": "jumprelu", "matryoshka": "jumprelu", "batchtopk": "jumprelu"}


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "matryoshka", "batchtopk"])
def test_recipe_fits_checkpoints_and_exports_each_architecture(tmp_path, arch):
    run = tmp_path / "run"
    extra = ["--model.matryoshka_prefixes", "[16, 64]"] if arch == "matryoshka" else []
    code, err = faults.cli(["fit", "--config", str(ROOT / "configs" / f"{arch}.yaml"),
                            "--trainer.default_root_dir", str(run), *SMALL, *extra])
    assert code == 0, err[-3000:]
    sae, info = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert info["global_step"] == 6 and sae.activation == {"matryoshka": "matryoshka_batchtopk"}.get(arch, arch)
    exported = load_sae(run / "sae")
    assert exported.activation == EXPORTED_AS[arch]
    x = torch.randn(512, 64)
    # the export (scale folded, SAELens's layout) reconstructs as the checkpoint's SAE does
    torch.testing.assert_close(exported.reconstruct(x), sae.eval().reconstruct(x), rtol=1e-4, atol=1e-4)
    if arch in ("relu", "jumprelu"):  # a learned L0, not a fixed k
        v, _ = sae.encode(x)
        assert (v > 0).sum(dim=1).float().std() > 0


def test_jumprelu_resumes_exactly_after_kill_9(tmp_path):
    """The kill -9 scenario of tests/train/test_resume.py (EMA, LR warm-up and decay, scalar normalisation, a DataLoader
    worker) with a JumpReLU SAE and its L0 penalty warm-up: same batches, losses, weights, thresholds and EMA."""
    model = """\
    k_aux: null
    activation: jumprelu
    sparsity_coef: 0.01
    sparsity_warmup_steps: 30
    jumprelu_init_threshold: 0.01
    """
    result = faults.resume_after_kill(tmp_path, model=model)
    assert result.ok, result.observed
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=False)
    sd = ckpt["state_dict"]
    assert sd["sae.threshold"].shape == (faults.N_LATENTS,) and "ema.shadow_threshold" in sd
    assert int(sd["sae.sparsity_step"]) == faults.MAX_STEPS


@pytest.mark.parametrize("kwargs, key", [
    ({"activation": "jumprelux"}, r"model.activation='jumprelux' is unknown: did you mean 'jumprelu'\?"),
    ({"activation": "relu", "sparsity_coef": -0.5}, r"model.sparsity_coef=-0.5 must be >= 0"),
    ({"activation": "jumprelu", "sparsity_coef": 0.1, "jumprelu_init_threshold": -1.0},
     r"model.jumprelu_init_threshold=-1.0 must be >= 0"),
    ({"activation": "jumprelu", "sparsity_coef": 0.1, "jumprelu_bandwidth": -1.0}, r"model.jumprelu_bandwidth=-1.0"),
    ({"activation": "topk", "sparsity_coef": 0.1}, r"model.sparsity_coef=0.1 does not apply to activation='topk'"),
    ({"activation": "relu", "sparsity_coef": 0.1, "jumprelu_bandwidth": 0.01},
     r"model.jumprelu_bandwidth=0.01 does not apply to activation='relu'"),
    ({"activation": "relu", "sparsity_coef": 0.1, "k_aux": 8}, r"model.k_aux=8 does not apply"),
    ({"activation": "batchtopk", "matryoshka_prefixes": [8]}, r"model.matryoshka_prefixes=\[8\] does not apply"),
    ({"activation": "relu"}, r"model.sparsity_coef is required with activation='relu'"),
    ({"activation": "matryoshka"}, r"model.matryoshka_prefixes is required"),
    ({"activation": "matryoshka", "matryoshka_prefixes": [64, 16]}, r"model.matryoshka_prefixes=\[64, 16\]"),
    ({"activation": "relu", "sparsity_coef": 0.1, "sparsity_warmup_steps": -1}, r"model.sparsity_warmup_steps=-1"),
    ({"activation": "jumprelu", "sparsity_coef": 0.1, "jumprelu_threshold_lr_scale": 0.0},
     r"model.jumprelu_threshold_lr_scale=0.0 must be > 0"),
    ({"activation": "topk", "jumprelu_threshold_lr_scale": 10.0},
     r"model.jumprelu_threshold_lr_scale=10.0 does not apply to activation='topk'"),
])
def test_bad_architecture_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        SAEModule(d_in=16, n_latents=128, k=4, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_activation_on_the_command_line_is_one_line_exit_2(tmp_path):
    code, err = faults.cli(["fit", "--config", str(ROOT / "configs" / "relu.yaml"), "--trainer.default_root_dir",
                            str(tmp_path), "--model.activation", "topkk", *SMALL])
    assert code == 2
    assert "model.activation='topkk' is unknown: did you mean 'topk'?" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_matryoshka_alias_trains_the_canonical_architecture():
    module = SAEModule(d_in=16, n_latents=64, k=4, activation="matryoshka", matryoshka_prefixes=[8, 32])
    assert module.sae.activation == "matryoshka_batchtopk" and module.sae.matryoshka_prefixes == [8, 32, 64]


def test_codes_of_a_variable_width_sae_stack_across_batches():
    """relu / jumprelu codes have the batch's largest L0 as width: stacking batches pads the narrower ones with
    zero values (not firing), keeping every value where it was."""
    from lit_sae.eval.codes import CodeBatch, stack_codes

    def batch(ctx, width):
        values = torch.arange(1, 1 + 2 * 3 * width, dtype=torch.float32).view(2, 3, width)
        return CodeBatch(torch.tensor(ctx), torch.zeros(2, 3, dtype=torch.long), values,
                         torch.arange(2 * 3 * width).view(2, 3, width), torch.ones(2, 3, dtype=torch.bool))

    a, b = batch([0, 1], 2), batch([2, 3], 5)
    out = stack_codes([a, b])
    assert out.values.shape == out.indices.shape == (4, 3, 5)
    assert torch.equal(out.values[:2, :, :2], a.values) and torch.equal(out.values[2:], b.values)
    assert not out.values[:2, :, 2:].any() and torch.equal(out.ctx, torch.tensor([0, 1, 2, 3]))


def test_jumprelu_thresholds_step_at_their_own_learning_rate():
    """The thresholds are Adam's second parameter group at lr * jumprelu_threshold_lr_scale (default 30): Adam's first
    step moves each parameter with a gradient by lr * sign(gradient) (bias-corrected moments), so after one step
    every threshold that got a gradient moved by exactly lr * scale and the other weights by at most lr."""
    from lit_sae.sae.activations import JUMPRELU_THRESHOLD_LR_SCALE

    for scale in (None, 7.0):
        torch.manual_seed(0)
        module = SAEModule(d_in=16, n_latents=64, k=1, activation="jumprelu", sparsity_coef=0.1, normalize="scalar",
                           jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.5, lr=1e-3, eps=1e-12,
                           jumprelu_threshold_lr_scale=scale)
        opt = module.configure_optimizers()
        assert [len(g["params"]) for g in opt.param_groups] == [4, 1]
        want = 1e-3 * (JUMPRELU_THRESHOLD_LR_SCALE if scale is None else scale)
        assert opt.param_groups[1]["params"][0] is module.sae.threshold and opt.param_groups[1]["lr"] == want
        module.sae.init_from_data_(torch.randn(256, 16))
        before = {n: p.detach().clone() for n, p in module.sae.named_parameters()}
        module.sae(torch.randn(256, 16)).loss.backward()
        got_grad = module.sae.threshold.grad != 0
        assert got_grad.sum() > 10
        opt.step()
        moved = (module.sae.threshold.detach() - before["threshold"]).abs()
        torch.testing.assert_close(moved[got_grad], torch.full_like(moved[got_grad], want), rtol=1e-4, atol=0)
        assert not moved[~got_grad].any()
        for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
            assert (getattr(module.sae, name).detach() - before[name]).abs().max() <= 1e-3 * (1 + 1e-4)


def test_jumprelu_l0_follows_its_penalty_in_a_short_run():
    """In a short run (120 Adam steps) the L0 weight sets the code's L0: with the thresholds at the SAE's own lr it
    could not (a pre-activation, a sum over d_in weights, outruns a threshold that moves by lr a step)."""
    g = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(128, 32, generator=g), dim=1)

    def batch(n=512):
        code = torch.rand(n, 128, generator=g) * (torch.rand(n, 128, generator=g) < 0.05)
        return code @ dictionary * 4

    def l0_after(coef, scale):
        torch.manual_seed(0)
        module = SAEModule(d_in=32, n_latents=128, k=1, activation="jumprelu", sparsity_coef=coef, lr=3e-3,
                           normalize="scalar", sparsity_warmup_steps=10, jumprelu_threshold_lr_scale=scale)
        module.sae.init_from_data_(batch(2048))
        opt = module.configure_optimizers()
        for _ in range(120):
            opt.zero_grad()
            module.sae(batch()).loss.backward()
            opt.step()
        with torch.no_grad():
            values, _ = module.sae.eval().encode(batch(2048))
        return float((values > 0).sum(dim=1).float().mean())

    low, high = l0_after(1e-3, 30.0), l0_after(1e-1, 30.0)
    assert high < 0.5 * low, (low, high)
    assert l0_after(1e-1, 1.0) > 2 * high  # at the SAE's own lr the same penalty leaves the code much denser
