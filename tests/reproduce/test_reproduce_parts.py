"""The reproduction's parts: the plan, the fits, the random-init arm, Multi-TopK's k override, and delta CE of many SAEs
against ``downstream_loss`` of each."""

import math

import pytest
import torch

from lit_sae.reproduce.claims import frontier_gap, power_law
from lit_sae.reproduce.grid import FULL, QUICK, sae_specs
from lit_sae.reproduce.measure import at_k, delta_ce_many, recon_metrics
from lit_sae.reproduce.train import randomize_encoder_
from lit_sae.sae.model import TopKSAE
from tests.support.tiny_lm import harvest_tiny


@pytest.mark.parametrize("setting", [QUICK, FULL])
def test_plan_shares_saes_and_covers_every_claim(setting):
    specs, groups, random_init = sae_specs(setting, steps=100)
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    assert {n for g in groups.values() for n in g} == set(names)
    assert random_init == {"dead-random-auxk", "dead-random-noauxk"}
    assert len(groups["sizes"]) >= 5 and len(groups["frontier_topk"]) >= 4
    assert groups["multi"][0] in names and groups["ablation"] == groups["frontier_topk"]
    # TopK at (k_ref, frontier size) serves the frontier, the size law and Multi-TopK's baseline: trained once.
    shared = f"topk-k{setting.k_ref}-n{setting.frontier_n_latents}"
    assert shared in groups["frontier_topk"] and shared in groups["sizes"] and groups["multi"][0] == shared
    by_name = {s["name"]: s for s in specs}
    assert by_name["dead-tied-noauxk"]["auxk_coef"] == 0 and by_name["dead-tied-auxk"]["auxk_coef"] == 1 / 32
    assert all(by_name[n]["sparsity_warmup_steps"] == 5 for n in groups["frontier_relu"])
    for spec in specs:  # every entry builds
        kw = {k: v for k, v in spec.items() if k != "name"}
        TopKSAE(16 if spec["n_latents"] < 16 else 32, kw.pop("n_latents"), kw.pop("k"), **kw)


def test_power_law_fit_exact_and_noisy():
    n = [256, 512, 1024, 2048, 4096]
    fit = power_law(n, [3.0 * x ** -0.25 for x in n])
    assert fit["exponent"] == pytest.approx(-0.25, abs=1e-12) and fit["a"] == pytest.approx(3.0, rel=1e-12)
    assert fit["exponent_se"] == pytest.approx(0, abs=1e-12) and fit["r2"] == pytest.approx(1.0)
    noisy = [3.0 * x ** -0.25 * f for x, f in zip(n, [1.02, 0.98, 1.01, 0.99, 1.0])]
    fit = power_law(n, noisy)
    assert -0.27 < fit["exponent"] < -0.23 and 0 < fit["exponent_se"] < 0.02 and fit["rms_log_residual"] > 0


def test_frontier_gap_hand_computed():
    ref = [(8, 0.4), (32, 0.2), (128, 0.1)]  # NMSE halves per 4x L0: log-log line
    gap = frontier_gap(ref, [(16, 2 * 0.4 * (16 / 8) ** -0.5), (64, 0.3), (1000, 0.01)])
    # at L0 16 the ref is 0.4 * 2^-0.5 -> ratio 2; at 64 the ref is 0.2 * 2^-0.5 -> ratio 1.5 / 2^-0.5; 1000 outside
    expected = (math.log(2) + math.log(0.3 / (0.2 * 2 ** -0.5))) / 2
    assert gap["n_matched"] == 2 and gap["mean_log_ratio"] == pytest.approx(expected, rel=1e-9)
    assert math.isnan(frontier_gap(ref, [(1, 0.5)])["ratio"])


def test_random_init_keeps_norms_and_unties():
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    tied = (sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True) * sae.W_dec).sum(1)
    assert torch.allclose(tied, torch.ones(64), atol=1e-5)
    norms = sae.W_enc.norm(dim=1).clone()
    randomize_encoder_(sae, seed=1)
    assert torch.allclose(sae.W_enc.norm(dim=1), norms, atol=1e-5)
    cos = (sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True) * sae.W_dec).sum(1)
    assert cos.abs().max() < 0.8 and cos.abs().mean() < 0.3


def test_at_k_and_recon_metrics_against_float64_reference():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4).eval()
    x = torch.randn(300, 16)
    with at_k(sae, 8):
        m = recon_metrics(sae, x, batch_size=128)
        assert sae.k == 8
    assert sae.k == 4
    sae.requires_grad_(False)
    pre = (x.double() - sae.b_pre.double()) @ sae.W_enc.double().T + sae.b_enc.double()
    v, i = pre.topk(8, dim=1)
    v = v.relu()
    x_hat = (v[..., None] * sae.W_dec.double()[i]).sum(1) + sae.b_pre.double()
    ref = float((x_hat - x.double()).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert m["nmse"] == pytest.approx(ref, rel=1e-5)
    assert m["l0"] == pytest.approx(float((v > 0).sum(1).double().mean()))
    assert m["dead_on_test"] == pytest.approx(1 - len(i[v > 0].unique()) / 64)
    with pytest.raises(ValueError, match="k=128"):
        with at_k(sae, 128):
            pass


def test_delta_ce_many_matches_downstream_loss(tmp_path):
    from lit_sae.data.lm import load_lm
    from lit_sae.eval.downstream import downstream_loss

    root = harvest_tiny(tmp_path)
    model, _ = load_lm(str(root / "lm"))
    torch.manual_seed(0)
    saes = {"a": TopKSAE(32, 64, 4).eval(), "b": TopKSAE(32, 128, 8, normalize="layernorm").eval()}
    ids = torch.randint(0, 400, (5, 32), generator=torch.Generator().manual_seed(0))
    many = delta_ce_many(model, "blocks.0.hook_resid_post", saes, ids, first_position=1, norm_threshold=50.0,
                         batch_size=2, progress=False)
    for name, sae in saes.items():
        one = downstream_loss(model, "blocks.0.hook_resid_post", sae, ids, first_position=1, norm_threshold=50.0,
                              batch_size=2, ablations=(), progress=False)
        assert many[name]["delta_ce"] == pytest.approx(one["delta_ce"], rel=1e-6, abs=1e-9)
        assert many[name]["clean_ce"] == pytest.approx(one["clean_ce"], rel=1e-9)
    assert many["a"]["delta_ce"] != pytest.approx(many["b"]["delta_ce"])


def test_recon_metrics_streams_numpy_rows_and_counts_top_4k():
    # A float16 numpy split (as memory-mapped shards hold) read in uneven chunks: the same NMSE as the whole float32
    # tensor at once; "alive at 4k" is a hand count of latents among some token's top-8 positive pre-activations.
    import numpy as np

    torch.manual_seed(1)
    sae = TopKSAE(8, 64, 2).eval().requires_grad_(False)
    xs = (np.random.default_rng(3).standard_normal((30, 8)) * 2 + 1).astype(np.float16)
    whole = recon_metrics(sae, torch.from_numpy(xs).float(), batch_size=4096)
    m = recon_metrics(sae, xs, batch_size=16, dead_at_4k=True)
    assert m["nmse"] == pytest.approx(whole["nmse"], rel=1e-9)
    assert m["l0"] == whole["l0"] and m["dead_on_test"] == whole["dead_on_test"]
    pre = sae.pre_acts(torch.from_numpy(xs).float())
    v, i = pre.topk(8, dim=1)
    alive = set(i[v > 0].tolist())
    assert m["dead_on_test_4k"] == pytest.approx(1 - len(alive) / 64)
    assert 0 < len(alive) < 64 and m["dead_on_test_4k"] < m["dead_on_test"]
    with pytest.raises(ValueError, match="no rows"):
        recon_metrics(sae, xs[:0])
