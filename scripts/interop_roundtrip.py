"""Round-trip SAEs between lit-sae and a real SAELens or sparsify install (run by scripts/check_interop.sh).

Runs inside the other library's own venv with lit-sae's source on PYTHONPATH (``lit_sae.sae.model``, ``lit_sae.artifacts.load`` and
``lit_sae.formats`` need only torch and safetensors). Both directions, on the same random inputs with a realistic
offset (activations with a large mean, as residual streams have):

- their save -> ``lit_sae.load_sae``: reconstructions must agree to 1e-5 (relative to the input's scale);
- lit-sae's export -> their loader: the same; plus SAEBench's decoder-norm check (rows unit norm to 1e-5).

Also writes SAEs of the width and hook point of ``--d-in`` / ``--hook`` into ``--work`` for the ``lit-sae test``
step. Prints one line per case and ``PASS`` / ``FAIL``; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lit_sae.artifacts.load import load_sae
from lit_sae.sae.model import TopKSAE

TOL = 1e-5
results: list[bool] = []


def report(name: str, theirs: torch.Tensor, ours: torch.Tensor, x: torch.Tensor, extra: str = "") -> None:
    err = float((theirs.double() - ours.double()).abs().max() / x.abs().max())
    ok = err <= TOL
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} max |x_hat_theirs - x_hat_lit_sae| / max|x| = {err:.2e}{extra}")


def inputs(d_in: int, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d_in, generator=g) * 2.0 + torch.randn(d_in, generator=g) * 4.0


def randomize_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "b_" in name or "bias" in name else 0.3))


def tied_(W_enc_rows, b_enc, W_dec, b_dec, work: Path, seed: int) -> None:
    """An SAE that reconstructs the test shards somewhat: unit decoder rows, tied encoder, b_dec = the data mean."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W = torch.randn(W_dec.shape, generator=g)
        W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        W_enc_rows.copy_(W_dec)
        b_enc.zero_()
        b_dec.copy_(load_file(str(work / "test_acts.safetensors"))["acts"].mean(0))


def lit_sae_sae(d_in: int, n: int, k: int, seed: int, **kw) -> TopKSAE:
    """A lit-sae SAE with trained-looking state: data-initialised, EMA-like decoder rows folded back to unit norm."""
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, n, k, **kw)
    sae.init_from_data_(inputs(d_in, 1024))
    with torch.no_grad():
        sae.W_dec.mul_(1 + 0.01 * torch.rand(n, 1))  # an EMA of unit rows is slightly off unit norm
        sae.b_enc.normal_(0, 0.3)
        if kw.get("activation") in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.4)
        elif kw.get("activation") == "jumprelu":  # a learned threshold per latent, some above typical pre-acts
            sae.threshold.copy_(torch.rand(n) * 0.8)
    sae.fold_decoder_norms_()  # what lit-sae's EMA swap and read_checkpoint do
    return sae.eval()


def saelens_cases(work: Path, d_in: int, hook: str) -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE as SLTopK
    from sae_lens.saes.topk_sae import TopKSAEConfig

    d, n = 32, 128
    x = inputs(d)
    meta = {"hook_name": hook}
    made = {
        "topk": SLTopK(TopKSAEConfig(d_in=d, d_sae=n, k=8)),
        "topk, rescale_acts_by_decoder_norm": SLTopK(TopKSAEConfig(d_in=d, d_sae=n, k=8,
                                                                   rescale_acts_by_decoder_norm=True)),
        "standard (relu)": StandardSAE(StandardSAEConfig(d_in=d, d_sae=n)),
        "standard, apply_b_dec_to_input=False": StandardSAE(StandardSAEConfig(d_in=d, d_sae=n,
                                                                              apply_b_dec_to_input=False)),
        "standard, layer_norm": StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, normalize_activations="layer_norm")),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=n)),
    }
    for i, (name, sae) in enumerate(made.items()):
        randomize_(sae, i)
        if name == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(n) * 0.5)
        folder = work / "saelens" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        sae.save_model(folder)
        reloaded = SAE.load_from_disk(folder)
        ours = load_sae(folder)
        with torch.no_grad():
            report(f"SAELens {name} save_model -> lit_sae.load_sae", reloaded.decode(reloaded.encode(x)),
                   ours.reconstruct(x), x)
    # BatchTopK: SAELens saves it for inference as JumpReLU (threshold on every latent)
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=n, k=8))
    randomize_(bt, 9)
    bt.topk_threshold = torch.tensor(0.6, dtype=torch.double)
    bt.save_inference_model(work / "saelens" / "batchtopk_inference")
    sl = SAE.load_from_disk(work / "saelens" / "batchtopk_inference")
    with torch.no_grad():
        report("SAELens batchtopk save_inference_model -> load_sae", sl.decode(sl.encode(x)),
               load_sae(work / "saelens" / "batchtopk_inference").reconstruct(x), x)

    # lit-sae export -> SAELens (relu as standard; jumprelu with its per-latent thresholds; batchtopk and matryoshka
    # BatchTopK as jumprelu with the learned threshold on every latent)
    exports = {"topk": {}, "topk, scalar scale folded": {"normalize": "scalar"},
               "topk, layernorm": {"normalize": "layernorm"}, "batchtopk": {"activation": "batchtopk"},
               "relu": {"activation": "relu"}, "relu, scalar scale folded": {"activation": "relu", "normalize": "scalar"},
               "jumprelu": {"activation": "jumprelu"},
               "jumprelu, scalar scale folded": {"activation": "jumprelu", "normalize": "scalar"},
               "matryoshka_batchtopk": {"activation": "matryoshka_batchtopk", "matryoshka_prefixes": [16, 64]}}
    expected_class = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "relu": "StandardSAE", "jumprelu": "JumpReLUSAE",
                      "matryoshka_batchtopk": "JumpReLUSAE"}
    for name, kw in exports.items():
        ours = lit_sae_sae(d, n, 8, 3, **kw)
        folder = work / "lit_sae_to_saelens" / name.replace(" ", "_").replace(",", "")
        ours.save_pretrained(folder, meta)
        theirs = SAE.load_from_disk(folder)
        norms = theirs.W_dec.norm(dim=1)
        unit = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5))  # SAEBench check_decoder_norms
        results.append(unit)
        arch = expected_class[kw.get("activation", "topk")]
        results.append(type(theirs).__name__ == arch)  # loaded as the architecture it is saved as
        if arch == "JumpReLUSAE":  # the thresholds SAELens applies are lit-sae's (scale folded), per latent
            want = ours.threshold.detach().expand(n) / (ours.norm_scale if ours.normalize == "scalar" else 1)
            results.append(bool(torch.allclose(theirs.threshold.detach(), want, rtol=1e-5, atol=1e-6)))
        with torch.no_grad():
            report(f"lit-sae {name} save_pretrained -> SAELens SAE.load_from_disk",
                   theirs.decode(theirs.encode(x)), ours.reconstruct(x), x,
                   f"; {type(theirs).__name__}, decoder rows unit norm (SAEBench check): {unit}")
    # For `lit-sae test --model.init_from`: a SAELens-saved SAE at the shards' width and hook point
    sae = SLTopK(TopKSAEConfig(d_in=d_in, d_sae=4 * d_in, k=8))
    tied_(sae.W_enc.T, sae.b_enc, sae.W_dec, sae.b_dec, work, 11)
    sae.cfg.metadata.hook_name = hook
    sae.save_model(work / "for_test" / "saelens")


def sparsify_cases(work: Path, d_in: int, hook: str) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    d, n = 32, 128
    x = inputs(d)
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=8))
    randomize_(sc, 5)
    sc.save_to_disk(work / "sparsify" / "layers.2")
    reloaded = SparseCoder.load_from_disk(work / "sparsify" / "layers.2")
    with torch.no_grad():
        enc = reloaded.encode(x)
        report("sparsify SparseCoder.save_to_disk -> lit_sae.load_sae",
               reloaded.decode(enc.top_acts, enc.top_indices), load_sae(work / "sparsify").reconstruct(x), x)
    from lit_sae.artifacts.export import export_sae

    for name, kw in {"topk": {}, "topk, scalar scale folded": {"normalize": "scalar"}}.items():
        ours = lit_sae_sae(d, n, 8, 4, **kw)
        out = work / "lit_sae_to_sparsify" / name.replace(" ", "_").replace(",", "")
        export_sae(ours, out, hook_point="blocks.2.hook_resid_post", format="sparsify")
        loaded = SparseCoder.load_many(str(out), local=True)
        theirs = loaded["layers.2"]
        with torch.no_grad():
            enc = theirs.encode(x)
            report(f"lit-sae {name} export --format sparsify -> SparseCoder.load_many",
                   theirs.decode(enc.top_acts, enc.top_indices), ours.reconstruct(x), x,
                   f"; hookpoints {sorted(loaded)}")
    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=4 * d_in, k=8))
    tied_(sc.encoder.weight, sc.encoder.bias, sc.W_dec, sc.b_dec, work, 12)
    from lit_sae.formats.sparsify import hookpoint_of

    sc.save_to_disk(work / "for_test" / "sparsify" / hookpoint_of(hook))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", choices=("saelens", "sparsify"), required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    args = parser.parse_args()
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    (saelens_cases if args.lib == "saelens" else sparsify_cases)(args.work, args.d_in, args.hook)
    print(("PASS" if all(results) else "FAIL") + f" {args.lib}: {sum(results)}/{len(results)} checks")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
