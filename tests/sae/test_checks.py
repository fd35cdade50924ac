"""Shapes and dtypes: every public entry point rejects a wrong tensor with a message naming the expected
shape, before any state (buffers, thresholds, counters, metric sums) changes."""

import pytest
import torch

from lit_sae.eval.metrics import L0, FeatureDensity, NormalizedMSE, RelativeMSE
from lit_sae.sae.model import TopKSAE
from lit_sae.train.module import SAEModule

D, N, K = 8, 32, 4


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


BAD_ACTS = {
    "width": (torch.randn(5, D + 1), r"\(B, 8\)"),
    "3-D": (torch.randn(2, 5, D), r"reshape\(-1, d_in\)"),
    "integer": (torch.ones(5, D, dtype=torch.long), "floating dtype"),
    "1-D": (torch.randn(D), r"\(B, 8\)"),
}


@pytest.mark.parametrize("case", BAD_ACTS, ids=str)
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sae_forward_and_encode_check_before_any_state_changes(case, activation):
    sae = TopKSAE(D, N, K, activation=activation).train()
    x, message = BAD_ACTS[case]
    before = snapshot(sae)
    for call in (sae.forward, sae.encode, sae.pre_acts, sae.init_from_data_):
        with pytest.raises(ValueError, match=message):
            call(x)
    assert unchanged(sae, before)  # batchtopk's threshold, b_pre, norm_scale, data_initialized untouched


def test_sae_checks_dead_mask_and_sparse_code():
    sae = TopKSAE(D, N, K)
    x = torch.randn(5, D)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(32,\)"):
        sae(x, torch.zeros(N))
    with pytest.raises(ValueError, match=r"bool tensor of shape \(32,\)"):
        sae(x, torch.zeros(N + 1, dtype=torch.bool))
    values, indices = sae.encode(x)
    with pytest.raises(ValueError, match=r"same shape \(B, k\)"):
        sae.decode(values, indices[:, :2])
    with pytest.raises(ValueError, match="int64"):
        sae.decode(values, indices.float())
    with pytest.raises(ValueError, match="floating"):
        sae.decode(values.long(), indices)
    with pytest.raises(ValueError, match="at least one row"):
        sae.init_from_data_(torch.zeros(0, D))
    torch.testing.assert_close(sae.decode(values, indices), sae(x).x_hat)  # the right input still works


def test_module_steps_check_before_counters_change():
    module = SAEModule(d_in=D, n_latents=N, k=K, export_dir="none")
    before = snapshot(module)
    bad = {"acts": torch.randn(6, D + 2), "ctx": torch.zeros(6), "pos": torch.zeros(6)}
    for step in (module.training_step, module.validation_step, module.test_step):
        with pytest.raises(ValueError, match=r"batch acts: expected shape \(B, 8\)"):
            step(bad, 0)
    assert unchanged(module, before)  # tokens_seen, tokens_since_fired, metric states
    assert int(module.val_nmse.count) == 0 and int(module.test_l0.count) == 0


def test_metrics_check_before_accumulating():
    x = torch.randn(4, D, dtype=torch.float64)
    for metric in (NormalizedMSE(), RelativeMSE()):
        metric.update(x, x * 0.5)
        state = {k: v.clone() for k, v in metric.metric_state.items()}
        with pytest.raises(ValueError, match=r"one shape \(B, d_in\)"):
            metric.update(x, x[:, :3])
        with pytest.raises(ValueError, match="floating"):
            metric.update(x.long(), x.long())
        assert all(torch.equal(state[k], v) for k, v in metric.metric_state.items())
        assert metric.compute() == pytest.approx(0.25 if isinstance(metric, RelativeMSE) else float(
            (0.25 * x.pow(2).sum()) / (x - x.mean(0)).pow(2).sum()))
    l0 = L0()
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        l0.update(torch.ones(3, 4, dtype=torch.long))
    assert int(l0.count) == 0
    density = FeatureDensity(N)
    values, indices = torch.rand(3, K) + 0.1, torch.randint(0, N, (3, K))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        density.update(values, indices + N)  # would have been dropped silently by bincount
    with pytest.raises(ValueError, match="one shape"):
        density.update(values, indices[:, :2])
    assert int(density.count) == 0 and int(density.fires.sum()) == 0


def test_evaluation_helpers_check_token_ids_and_probe_data():
    from lit_sae.eval.ablation import ablation_sparsity
    from lit_sae.eval.downstream import downstream_loss, mean_activation
    from lit_sae.eval.probes import probe_loss

    sae = TopKSAE(D, N, K)
    for ids, message in ((torch.rand(2, 16), "integer token ids"), (torch.ones(16, dtype=torch.long),
                                                                     r"\(n_contexts, T\)")):
        with pytest.raises(ValueError, match=message):
            downstream_loss(None, "blocks.0.hook_resid_post", sae, ids)
        with pytest.raises(ValueError, match=message):
            ablation_sparsity(None, "blocks.0.hook_resid_post", sae, ids)
        with pytest.raises(ValueError, match=message):
            mean_activation(None, "blocks.0.hook_resid_post", ids)
    data = {"acts": torch.randn(10, D), "labels": torch.zeros(9, 3), "context": torch.zeros(10)}
    with pytest.raises(ValueError, match=r"labels \(10, n_tasks\)"):
        probe_loss(sae, data)
    with pytest.raises(ValueError, match="from probe_dataset"):
        probe_loss(sae, {"acts": torch.randn(10, D)})
