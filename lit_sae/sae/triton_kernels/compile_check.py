"""Compile every Triton kernel of lit-sae for a CUDA architecture on a machine without a GPU, and report its resources.

The Triton interpreter checks what a kernel computes, not whether it compiles: a kernel can pass there and still be
rejected by the compiler (a global that is not a ``tl.constexpr``, a type that does not unify across a loop). This
runs Triton's real compiler (Triton IR, then PTX, then ``ptxas`` to a cubin, all shipped in the triton wheel) for
the configurations the fast path launches on CUDA (bf16 pre-activations under autocast, fp32 weights; the AuxK and
Multi-TopK selections), and reads registers and local-memory spills from the cubin with the wheel's ``cuobjdump``.

    python -m lit_sae.sae.triton_kernels.compile_check [--arch 90]    # exits 1 if a kernel fails to compile

It imports the kernels natively: run it without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}


def configurations():
    """(label, kernel, signature, constexprs) of each launch the CUDA path makes (lit-sae's default settings:
    k 32, Multi-TopK's 4k = 128, AuxK's k_aux = 384 at d_in 768; bf16 pre-activations, fp32 weights)."""
    from lit_sae.sae.triton_kernels import sparse, topk

    for label, K, k_aux in (("select k 32", 32, 0), ("select k 128 (Multi-TopK)", 128, 0),
                            ("select k 32 + AuxK 384", 32, 384)):
        for dt in (torch.bfloat16, torch.float32):
            sig = {"pre_ptr": _PTR[dt], "stride_r": "i32", "R": "i32", "M": "i32", "dead_ptr": "*i32",
                   "val_ptr": _PTR[dt], "idx_ptr": "*i64", "aux_val_ptr": _PTR[dt], "aux_idx_ptr": "*i64"}
            meta = topk.launch_meta(K, k_aux, cuda=True)
            const = {k: v for k, v in meta.items() if k != "num_warps"}
            yield f"{label}, {str(dt)[6:]}", topk._select_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, meta
    w = _PTR[torch.float32]
    kernels = (
        ("gather_sum", sparse._gather_sum_kernel,
         {"val_ptr": w, "idx_ptr": "*i64", "w_ptr": w, "init_ptr": w, "out_ptr": w, "B": "i32", "m": "i32",
          "d": "i32"}),
        ("gather_dot", sparse._gather_dot_kernel,
         {"idx_ptr": "*i64", "w_ptr": w, "g_ptr": w, "out_ptr": w, "B": "i32", "m": "i32", "d": "i32"}),
        ("scatter_sorted", sparse._scatter_sorted_kernel,
         {"row_ptr": "*i64", "g_ptr": w, "start_ptr": "*i64", "x_ptr": w, "out_ptr": w, "n": "i32", "P": "i32",
          "d": "i32"}),
    )
    for name, kernel, sig in kernels:
        meta = sparse.launch_meta(name, True, torch.float32)
        const = {k: v for k, v in meta.items() if k != "num_warps"}
        yield f"{name}, float32", kernel, {**sig, **dict.fromkeys(const, "constexpr")}, meta
        if "INIT" in meta:  # the latent-sharded decode continues a partial sum
            yield f"{name} (continued), float32", kernel, {**sig, **dict.fromkeys(const, "constexpr")}, \
                {**meta, "INIT": True}


def _resources(cubin: bytes) -> dict:
    """Registers and local memory (spills) per thread, from ``cuobjdump -res-usage`` of the cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_all(arch: int = 90, num_warps: int = 4) -> list[dict]:
    """Compile each of ``configurations()`` for ``sm_{arch}``; one dict per launch: label, ok, seconds, error or
    the cubin's registers / local bytes / shared bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for label, kernel, sig, meta in configurations():
        t0 = time.perf_counter()
        try:
            meta = dict(meta)
            warps = meta.pop("num_warps", num_warps)
            compiled = triton.compile(ASTSource(kernel, sig, constexprs=meta), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps})
            rows.append({"label": label, "ok": True, "num_warps": warps, **_resources(compiled.asm["cubin"])})
        except Exception as e:  # a compile error is the result being reported
            rows.append({"label": label, "ok": False, "error": f"{type(e).__name__}: {str(e)[-600:]}"})
        rows[-1]["seconds"] = time.perf_counter() - t0
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100 / H200)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter skips the compiler)", file=sys.stderr)
        return 2
    rows = compile_all(args.arch)
    for r in rows:
        if r["ok"]:
            print(f"ok   {r['label']:<40} sm_{args.arch}: {r.get('reg', '?')} registers, {r.get('local', '?')} B local "
                  f"(spills), {r.get('shared', '?')} B shared, {r['num_warps']} warps, {r['seconds']:.1f} s")
        else:
            print(f"FAIL {r['label']:<40} {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
