"""Round-trip transcoders between lit-sae and a real SAELens or circuit-tracer install (run by
scripts/check_interop.sh inside the library's own venv, with lit-sae's source on PYTHONPATH).

For every transcoder variant the layout can hold (relu / jumprelu / batchtopk codes, with and without the skip
term, scalar-normalised so that the folding of both scales is exercised):

- lit-sae's export -> their loader: their prediction of the target must equal lit-sae's to 1e-5 (relative to the
  target's scale), on inputs with a large offset;
- their save -> ``lit_sae.load_sae``: the same, for a transcoder the library builds and saves itself;
- a topk transcoder and (circuit-tracer) a d_out != d_in one must be refused by the export, naming the key.

Prints one line per case and PASS / FAIL; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lit_sae.artifacts.export import export_sae
from lit_sae.artifacts.load import load_sae
from lit_sae.sae.transcoder import Transcoder

TOL = 1e-5
LAYER = 3
HOOK_IN, HOOK_OUT = f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"
results: list[bool] = []


def report(name: str, theirs: torch.Tensor, ours: torch.Tensor, y: torch.Tensor) -> None:
    err = float((theirs.double() - ours.double()).abs().max() / y.abs().max())
    results.append(err <= TOL)
    print(f"{'ok  ' if err <= TOL else 'FAIL'} {name:64s} max |y_theirs - y_lit_sae| / max|y| = {err:.2e}")


def data(d_in: int, d_out: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g) * 2.0 + torch.randn(d_in, generator=g) * 4.0
    return x, torch.randn(n, d_out, generator=g) * 0.7 + 0.3


def trained_like(activation: str, skip: bool, d_in: int, d_out: int) -> tuple[Transcoder, torch.Tensor]:
    torch.manual_seed(0)
    extra = {"sparsity_coef": 0.01} if activation in ("relu", "jumprelu") else {}
    tc = Transcoder(d_in, 4 * d_in, 6, d_out=d_out, skip=skip, activation=activation, normalize="scalar", **extra)
    x, y = data(d_in, d_out)
    tc.init_from_data_(x, y)
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3)
        if skip:
            tc.W_skip.normal_(0, 0.1)
        if activation == "jumprelu":
            tc.threshold.uniform_(0.0, 0.5)
    tc.train()
    tc(x, target=y)  # batchtopk: sets the inference threshold
    return tc.eval(), x


def saelens_case(work: Path, d: int) -> None:
    from sae_lens import SAE

    for activation in ("relu", "batchtopk", "jumprelu"):
        for skip in (False, True):
            tc, x = trained_like(activation, skip, d, d)
            out = work / f"saelens_{activation}_{skip}"
            export_sae(tc, out, hook_point=HOOK_IN, target_hook_point=HOOK_OUT)
            theirs = SAE.load_from_disk(str(out))
            with torch.no_grad():
                y_theirs = theirs(x)
            report(f"lit-sae {activation} skip={skip} -> SAELens {type(theirs).__name__}", y_theirs,
                   tc.reconstruct(x), y_theirs)
    # their save -> lit-sae
    from sae_lens import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    torch.manual_seed(2)
    cfg = JumpReLUSkipTranscoderConfig(d_in=d, d_sae=4 * d, d_out=d, apply_b_dec_to_input=False)
    theirs = JumpReLUSkipTranscoder(cfg)
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.W_dec, theirs.W_skip):
            p.normal_(0, 0.2)
        theirs.b_enc.normal_(0, 0.3)
        theirs.b_dec.normal_()
        theirs.threshold.uniform_(0, 0.4)
    theirs.save_model(str(work / "saved_by_saelens"))
    x, _ = data(d, d)
    with torch.no_grad():
        y_theirs = theirs(x)
    report("SAELens JumpReLUSkipTranscoder.save_model -> lit_sae.load_sae", y_theirs,
           load_sae(work / "saved_by_saelens").reconstruct(x), y_theirs)
    refused(lambda: export_sae(trained_like("topk", False, d, d)[0], work / "no", hook_point=HOOK_IN),
            "topk transcoder -> SAELens", "model.activation", work / "no")


def circuit_tracer_case(work: Path, d: int) -> None:
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, load_relu_transcoder

    for activation in ("relu", "batchtopk", "jumprelu"):
        for skip in (False, True):
            tc, x = trained_like(activation, skip, d, d)
            out = work / f"ct_{activation}_{skip}"
            export_sae(tc, out, hook_point=HOOK_IN, target_hook_point=HOOK_OUT, format="circuit-tracer")
            theirs = load_relu_transcoder(str(out / f"layer_{LAYER}.safetensors"), LAYER, device=torch.device("cpu"),
                                          dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
            with torch.no_grad():
                y_theirs = theirs(x)
            report(f"lit-sae {activation} skip={skip} -> circuit-tracer load_relu_transcoder", y_theirs,
                   tc.reconstruct(x), y_theirs)
    # their save -> lit-sae
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    torch.manual_seed(3)
    theirs = SingleLayerTranscoder(d, 4 * d, JumpReLU(torch.rand(4 * d) * 0.4, 0.1), LAYER, skip_connection=True,
                                   device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.W_dec, theirs.W_skip):
            p.normal_(0, 0.2)
        theirs.b_enc.normal_(0, 0.3)
        theirs.b_dec.normal_()
    theirs.to_safetensors(str(work / f"layer_{LAYER}.safetensors"))
    x, _ = data(d, d)
    with torch.no_grad():
        y_theirs = theirs(x)
    report("circuit-tracer SingleLayerTranscoder.to_safetensors -> lit_sae.load_sae", y_theirs,
           load_sae(work / f"layer_{LAYER}.safetensors").reconstruct(x), y_theirs)
    refused(lambda: export_sae(trained_like("topk", False, d, d)[0], work / "no", format="circuit-tracer"),
            "topk transcoder -> circuit-tracer", "model.activation", work / "no")
    refused(lambda: export_sae(trained_like("batchtopk", False, d, d // 2)[0], work / "no2", format="circuit-tracer"),
            "d_out != d_in -> circuit-tracer", "model.d_out", work / "no2")


def refused(call, name: str, key: str, out: Path) -> None:
    try:
        call()
    except ValueError as exn:
        ok = str(exn).startswith(key) and not out.exists()
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name:64s} refused: {str(exn)[:90]}...")
        return
    results.append(False)
    print(f"FAIL {name}: exported without a word")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", choices=("saelens", "circuit-tracer"), required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--d-in", type=int, default=32)
    args = ap.parse_args()
    work = Path(args.work) / f"transcoders_{args.lib}"
    work.mkdir(parents=True, exist_ok=True)
    (saelens_case if args.lib == "saelens" else circuit_tracer_case)(work, args.d_in)
    ok = all(results) and bool(results)
    print(f"{'PASS' if ok else 'FAIL'} {args.lib} transcoders ({sum(results)}/{len(results)})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
