"""Same-GPU race: tokens/s of one TopK SAE training step in lit-sae and in its peers, on the same shapes and data.

Every contestant trains a TopK SAE (d_in, n_latents, k; AuxK off: nothing is dead in this steady state) on the same
(B, d_in) fp32 batch (one tensor, drawn once from a fixed seed), with fp32 weights, bf16 autocast for the forward,
Adam (lr 1e-4, eps 6.25e-10, fused), and each library's own decoder-gradient projection and renormalisation:

    lit-sae   TopKSAE (its fast path: Triton kernels on CUDA when triton imports, ``LIT_SAE_KERNELS`` decides)
    sparsify  EleutherAI's SparseCoder (its fused encoder and its Triton decoder ``xformers_embedding_bag``), loss fvu
    openai    OpenAI's sparse_autoencoder/kernels.py (``TritonDecoderAutograd``, ``triton_sparse_transpose_dense_matmul``
              for the encoder's gradient, ``normalized_mse``, ``triton_add_mul_`` for the projection) in the training
              step of its train.py ``FastAutoencoder`` without sharding, and with the gradients zeroed every step
              (the released ``training_loop_`` never zeroes them). That repository is not on PyPI: pass its
              kernels.py with ``--openai-kernels`` (a checkout of github.com/openai/sparse_autoencoder).
    saelens   SAELens's TopK training SAE (``TopKTrainingSAE``), when ``sae_lens`` imports.

A contestant that cannot be imported or fails is reported with its reason; the others still run. Each step is
timed after ``--warmup`` untimed steps, with the device synchronised; tokens/s = B / median step time.

    python3 scripts/race.py --device cuda --batch 131072 --n-latents 32768 131072 --json race.json
    TRITON_INTERPRET=1 python3 scripts/race.py --dry-run     # CPU: tiny shapes, one step each, Triton interpreted
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEERS = ("lit-sae", "sparsify", "openai", "saelens")
LR, EPS = 1e-4, 6.25e-10  # Adam, as lit_sae.train.module and OpenAI's training code


def make_batch(B: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """The one (B, d) fp32 batch every contestant trains on: N(0.3, 1) entries (a large mean, as activations have)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, generator=g) + 0.3).to(device)


def _adam(params):
    return torch.optim.Adam(params, lr=LR, eps=EPS, fused=True)


def lit_sae_step(x, n, k, bf16):
    from lit_sae.sae.model import TopKSAE

    d = x.shape[1]
    sae = TopKSAE(d, n, k, k_aux=d // 2).to(x.device)
    opt = _adam(sae.parameters())

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x)
        out.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        return out.nmse

    return step


def sparsify_step(x, n, k, bf16):
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k), device=x.device, dtype=torch.float32)
    opt = _adam(sae.parameters())

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):  # sparsify's forward autocasts on CUDA
            out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        return out.fvu

    return step


def load_openai_kernels(path: str):
    """OpenAI's sparse_autoencoder/kernels.py as a module (it imports only torch and triton)."""
    spec = importlib.util.spec_from_file_location("openai_sae_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def openai_step(x, n, k, bf16, kernels_path):
    ok = load_openai_kernels(kernels_path)
    d = x.shape[1]
    enc = torch.nn.Linear(d, n, bias=False, device=x.device)
    W_enc, b_enc = enc.weight, torch.nn.Parameter(torch.zeros(n, device=x.device))
    b_pre = torch.nn.Parameter(torch.zeros(d, device=x.device))
    # Their decoder weight is (d, n) stored column-major (contiguous when transposed), tied to the encoder at init.
    W_dec = torch.nn.Parameter(W_enc.detach().clone().T.contiguous().T)
    W_dec.data /= W_dec.data.norm(dim=0)
    opt = _adam([W_enc, b_enc, b_pre, W_dec])

    class Encode(torch.autograd.Function):
        """FastAutoencoder.forward's encoder, one shard, no AuxK: top-k of the dense pre-activations, and a backward
        from the selected pairs through OpenAI's sparse-transpose kernel."""

        @staticmethod
        def forward(ctx, x, pre_bias, weight, latent_bias):
            xc = x - pre_bias
            top = torch.topk(torch.nn.functional.linear(xc, weight, latent_bias), k=k, dim=-1)
            ctx.save_for_backward(xc, weight, top.indices)
            return top.indices, top.values

        @staticmethod
        def backward(ctx, _g_idx, grad_vals):
            xc, weight, inds = ctx.saved_tensors
            g = grad_vals.float().contiguous()
            grad_sum = torch.zeros(n, dtype=torch.float32, device=g.device).scatter_add_(0, inds.flatten(), g.flatten())
            dW = ok.triton_sparse_transpose_dense_matmul(inds, g, xc.float().contiguous(), N=n)
            return None, -(grad_sum @ weight), dW, grad_sum

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            inds, vals = Encode.apply(x, b_pre, W_enc, b_enc)
            vals = torch.relu(vals).float().contiguous()
            recons = ok.TritonDecoderAutograd.apply(inds, vals, W_dec) + b_pre
            loss = ok.normalized_mse(recons.float().contiguous(), x)
        loss.backward()
        W_dec.data /= W_dec.data.norm(dim=0)  # their order: renormalise, then project the gradient
        ok.triton_add_mul_(W_dec.grad, torch.einsum("bn,bn->n", W_dec.data, W_dec.grad), W_dec.data, c=-1)
        opt.step()
        opt.zero_grad(set_to_none=True)  # what the released loop is missing
        return loss

    return step


def saelens_step(x, n, k, bf16):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    d = x.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=str(x.device), dtype="float32"))
    opt = _adam(sae.parameters())

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                          n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    return step


def build(peer: str, x, n, k, bf16, args):
    if peer == "lit-sae":
        return lit_sae_step(x, n, k, bf16)
    if peer == "sparsify":
        return sparsify_step(x, n, k, bf16)
    if peer == "openai":
        if not args.openai_kernels or not Path(args.openai_kernels).is_file():
            raise FileNotFoundError(f"--openai-kernels {args.openai_kernels!r}: no such file (OpenAI's repository is "
                                    "not on PyPI: pass sparse_autoencoder/kernels.py of a checkout)")
        return openai_step(x, n, k, bf16, args.openai_kernels)
    return saelens_step(x, n, k, bf16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def race_one(peer: str, x, n: int, k: int, args) -> dict:
    """Build and time one contestant; a failure becomes the row's ``status``."""
    row = {"peer": peer, "n_latents": n, "k": k, "batch": x.shape[0], "d_in": x.shape[1], "device": args.device}
    bf16 = args.device == "cuda"
    stage = "setup"
    try:
        torch.manual_seed(0)
        step = build(peer, x, n, k, bf16, args)
        stage = "step"
        for _ in range(args.warmup):
            step()
        _sync(args.device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        row.update(status="ok", step_ms=s * 1e3, tokens_per_s=x.shape[0] / s, loss=float(loss.detach()))
    except Exception as e:  # one contestant's failure is a result to report
        row.update(status=f"{stage} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| peer | n_latents | k | step ms | tokens/s | lit-sae / this | status |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ours = next((o for o in rows if o["peer"] == "lit-sae" and o["n_latents"] == r["n_latents"]
                     and o.get("status") == "ok"), None)
        if r["status"] == "ok":
            ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}" if ours else ""
            lines.append(f"| {r['peer']} | {r['n_latents']} | {r['k']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
                         f"| {ratio} | ok |")
        else:
            lines.append(f"| {r['peer']} | {r['n_latents']} | {r['k']} | | | | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=131072, help="tokens per step (the same batch for every peer)")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, Adam state)")
    p.add_argument("--openai-kernels", default=os.environ.get("OPENAI_SAE_KERNELS"),
                   help="path of OpenAI's sparse_autoencoder/kernels.py (default: $OPENAI_SAE_KERNELS)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes (batch 64, d_in 32, n 256, k 8), one step each: imports and setup; "
                        "Triton code runs only with TRITON_INTERPRET=1 set before the start")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.batch, args.d_in, args.n_latents, args.k, args.steps, args.warmup = "cpu", 64, 32, [256], 8, 1, 0
        if os.environ.get("TRITON_INTERPRET") == "1":
            os.environ.setdefault("LIT_SAE_KERNELS", "triton")  # lit-sae's Triton kernels, interpreted
    x = make_batch(args.batch, args.d_in, args.device)
    rows = []
    for n in args.n_latents:
        for peer in args.peers:
            row = race_one(peer, x, n, args.k, args)
            rows.append(row)
            print(f"{peer} n={n}: {row['status']}" + (f", {row['tokens_per_s']:,.0f} tokens/s" if row["status"] == "ok"
                                                      else ""), file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(f"race: batch {args.batch} tokens, d_in {args.d_in}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "") + f", torch {torch.__version__}")
    print(format_table(rows))
    # lit-sae must run; in a dry run a peer may fail only in its step (its Triton code under the interpreter).
    ours_ok = all(r["status"] == "ok" for r in rows if r["peer"] == "lit-sae")
    setup_ok = all(not r["status"].startswith("setup failed: ModuleNotFoundError") or r["peer"] == "saelens"
                   for r in rows) if args.dry_run else True
    return 0 if ours_ok and setup_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
