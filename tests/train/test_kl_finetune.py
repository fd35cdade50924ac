"""End-to-end KL fine-tune (``model.kl_coef``, ``lit_sae.train.kl_finetune``): the loss and its gradient against a
float64 reference written out by hand on a tiny GPT-2, the frozen LM, and the objective's pieces."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lit_sae.train.kl_finetune import check_kl_keys
from lit_sae.train.module import SAEModule

HOOK = "blocks.0.hook_resid_post"
V, T, B, D, N, K = 97, 12, 3, 16, 48, 4


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=2, n_head=2,
                                                           initializer_range=0.3))  # peaked next-token distributions
    return lm.double().eval().requires_grad_(False)


def module(kl_coef: float, kl_mse_coef: float, lm, threshold=None) -> SAEModule:
    torch.manual_seed(1)
    m = SAEModule(d_in=D, n_latents=N, k=K, kl_coef=kl_coef, kl_mse_coef=kl_mse_coef, hook_point=HOOK).double()
    with torch.no_grad():  # a data-initialised SAE: b_pre near the activations, encoder as the decoder's transpose
        m.sae.b_pre.normal_(0, 0.1)
        m.sae.b_enc.normal_(0, 0.1)
    m._kl_context = (lm, HOOK, 1, threshold)
    return m


def reference_loss(lm, ids, W_enc, b_enc, W_dec, b_pre, kl_coef, mse_coef, threshold=None):
    """The objective written out: TopK SAE (Gao et al. eq. 1-2), the activation after block 0 replaced at positions
    >= 1 (and norm <= threshold), explicit log-softmax KL of the next-token distributions, mean over positions
    1..T-2; NMSE = sum of squared errors / sum of squared deviations from the batch mean."""
    held = {}

    def sae(x):
        pre = (x - b_pre) @ W_enc.T + b_enc
        vals, idx = pre.topk(K, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return z @ W_dec + b_pre

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        keep = torch.zeros(h.shape[:2], dtype=torch.bool)
        keep[:, 1:] = True
        if threshold is not None:
            keep &= h.norm(dim=-1) <= threshold
        x = h[keep]
        x_hat = sae(x)
        held["nmse"] = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        new = h.clone()
        new[keep] = x_hat
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def logprobs(logits):
        z = logits[:, 1:-1]
        return (z - z.exp().sum(-1, keepdim=True).log()).flatten(0, 1)

    clean = logprobs(lm(input_ids=ids).logits)
    handle = lm.transformer.h[0].register_forward_hook(hook)
    try:
        spliced = logprobs(lm(input_ids=ids).logits)
    finally:
        handle.remove()
    kl = (clean.exp() * (clean - spliced)).sum(-1).mean()
    return kl_coef * kl + mse_coef * held["nmse"], kl


@pytest.mark.parametrize("kl_coef,kl_mse_coef", [(1.0, 0.0), (0.7, 0.5)])
def test_loss_and_gradient_match_a_float64_reference(kl_coef, kl_mse_coef):
    lm = tiny_gpt2()
    lm_before = copy.deepcopy(lm.state_dict())
    m = module(kl_coef, kl_mse_coef, lm)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    res = m.kl_objective(ids)
    res["loss"].backward()
    sae = m.sae
    params = {k: getattr(sae, k).detach().clone().requires_grad_(True) for k in ("W_enc", "b_enc", "W_dec", "b_pre")}
    ref, ref_kl = reference_loss(lm, ids, **params, kl_coef=kl_coef, mse_coef=kl_mse_coef)
    ref.backward()
    # Both sides run float64 with the same inputs; they differ only in summation order (log-softmax over V, the
    # matmuls over D and N, the mean over B * (T - 2) positions): a relative error of a few eps64 per reduction, so
    # eps64 * sqrt(V * N * B * T) bounds it (about 1e-13) with room to spare for error growth through 2 layers.
    tol = torch.finfo(torch.float64).eps * math.sqrt(V * N * B * T) * 10
    assert abs(res["loss"].item() - ref.item()) <= tol * abs(ref.item())
    assert abs(res["kl"].item() - ref_kl.item()) <= tol * abs(ref_kl.item())
    assert ref_kl.item() > 1e-4  # the spliced run differs: the test compares something
    for name, p in params.items():
        got = getattr(sae, name).grad
        scale = p.grad.abs().max()
        assert scale > 0, name
        assert (got - p.grad).abs().max() <= tol * scale, (name, (got - p.grad).abs().max().item(), scale.item())
    # The LM is frozen: no gradient reaches its parameters, and an optimizer step of the module leaves them alone.
    assert all(p.grad is None for p in lm.parameters())
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    opt.step()
    assert all(torch.equal(lm_before[k], v) for k, v in lm.state_dict().items())
    assert not any(k.startswith("lm") or ".transformer." in k for k in m.state_dict())


def test_norm_filter_keeps_outliers_clean_as_the_evaluation_does():
    """Positions whose activation norm exceeds the harvest's threshold are not replaced (as
    ``lit_sae.eval.downstream`` evaluates): the module and the reference agree with a threshold that cuts some."""
    lm = tiny_gpt2()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    from lit_sae.data.lm import truncated_forward

    norms = truncated_forward(lm, ids, HOOK)[:, 1:].norm(dim=-1)
    threshold = norms.median().item()
    m = module(1.0, 1.0, lm, threshold)
    res = m.kl_objective(ids)
    kept = res["mask"][:, 1:]
    assert 0 < kept.sum() < kept.numel() and not res["mask"][:, 0].any()
    params = {k: getattr(m.sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_pre")}
    ref, _ = reference_loss(lm, ids, **params, kl_coef=1.0, mse_coef=1.0, threshold=threshold)
    assert abs(res["loss"].item() - ref.item()) <= 1e-10 * abs(ref.item())


def test_delta_ce_is_the_spliced_minus_clean_next_token_loss():
    lm = tiny_gpt2()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    m = module(1.0, 1.0, lm)
    res = m.kl_objective(ids)
    from lit_sae.eval.downstream import downstream_loss

    ref = downstream_loss(lm, HOOK, m.sae, ids, ablations=(), progress=False)
    assert abs(res["delta_ce"].item() - ref["delta_ce"]) <= 1e-5 * max(abs(ref["delta_ce"]), 1e-3)
    # the evaluation's KL (float32 log-softmax) is the objective's KL
    assert abs(res["kl"].item() - ref["kl_sae"]) <= 1e-5 * abs(ref["kl_sae"])


@pytest.mark.parametrize("kwargs,key", [({"kl_coef": -1.0}, "model.kl_coef"),
                                        ({"kl_coef": 0.0, "kl_mse_coef": 0.0}, "model.kl_coef"),
                                        ({"kl_coef": 1.0, "lr": "auto"}, "model.lr=auto")])
def test_bad_keys_name_the_key(kwargs, key):
    kl_coef, mse, lr = kwargs.get("kl_coef"), kwargs.get("kl_mse_coef", 1.0), kwargs.get("lr")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_kl_keys(kl_coef, mse, lr)
