"""A TopK SAE sharded over its latents (lit_sae.parallel.tensor) equals one unsharded process, on CPU/gloo.

Spawned processes on a (data x tensor) DeviceMesh of 1x2, 1x4 and 2x2, float64, with Multi-TopK and AuxK on:
- tie-heavy integer inputs: latent indices and values identical to the unsharded fast path (same tie order);
- random inputs: forward values and indices identical, loss and every gradient (W_enc, b_enc, W_dec rows of the
  shard, b_pre) equal to 1e-6, the data-parallel ranks holding halves of the global batch;
- 20 Adam steps with the decoder constraints and sharded dead-latent counters: weights, Adam moments and counters
  equal to 1e-5.
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_sae.sae.model import TopKSAE

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

D, N, K, K_AUX, B = 8, 64, 4, 6, 32


# Relative tolerance of one float64 dot product over d_in computed in two summation orders: each order is within
# about D * eps64 of the exact value (Higham's bound, terms of one sign), so two orders within 2 * D * eps64; x4 for
# the bias additions and the input centring (x - b_pre) before it.
VALUE_TOL = 8 * D * torch.finfo(torch.float64).eps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, tol, what):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _check_ties(full, sh, group_rows):
    g = torch.Generator().manual_seed(5)
    ref = copy.deepcopy(full)
    with torch.no_grad():
        W = torch.randint(-1, 2, (N, D), generator=g).double()
        for m in (ref, sh):
            m.W_enc.copy_(W[sh.local_rows()] if m is sh else W)
            m.b_enc.zero_()
            m.b_pre.zero_()
    x = torch.randint(-2, 3, (B, D), generator=g).double()
    dead = torch.rand(N, generator=g) < 0.5
    ro, so = ref(x, dead), sh(x[group_rows], dead[sh.local_rows()])
    # Small integers in float64: every product and partial sum is an exact integer, so any summation order gives
    # the same bits and bit-equality is a fair test of the tie order.
    assert torch.equal(ro.latent_indices[group_rows], so.latent_indices), "tie order differs"
    assert torch.equal(ro.latent_values[group_rows], so.latent_values)
    for f in ("nmse", "multik_loss", "auxk_loss"):
        assert float(getattr(ro, f)) == pytest.approx(float(getattr(so, f)), rel=1e-12), (f, float(getattr(ro, f)), float(getattr(so, f)))


def _worker(rank, world, dp, tp, port, ckdir):
    from torch.distributed.device_mesh import init_device_mesh

    from lit_sae.parallel.data_parallel import GroupSum
    from lit_sae.parallel.dcp import load_sharded, save_sharded
    from lit_sae.parallel.sharding import gather_full
    from lit_sae.parallel.tensor import ShardedTopKSAE, average_gradients_, update_dead_counts_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data", "tensor"))
        tp_group, dp_group = mesh.get_group("tensor"), mesh.get_group("data")
        d_rank = mesh.get_local_rank("data")
        rows = slice(d_rank * B // dp, (d_rank + 1) * B // dp)  # this data-parallel rank's part of the batch
        torch.manual_seed(0)
        full = TopKSAE(D, N, K, k_aux=K_AUX, multi_topk=True, multi_topk_factor=2).double().train()
        with torch.no_grad():
            full.b_enc.normal_(0, 0.1)
            full.b_pre.normal_(0, 0.1)
        sh = ShardedTopKSAE.from_full(full, tp_group).train()
        if dp > 1:
            sh.batch_sum = GroupSum(dp_group)
        local = sh.local_rows()
        assert sh.W_enc.shape == (N // tp, D) and sh.W_dec.shape == (N // tp, D)

        tied = ShardedTopKSAE.from_full(full, tp_group).train()
        if dp > 1:
            tied.batch_sum = GroupSum(dp_group)
        _check_ties(full, tied, rows)

        # one step: forward, loss, gradients
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, D, generator=g).double() * 2 + 0.5
        dead = torch.rand(N, generator=g) < 0.3
        ref = copy.deepcopy(full)
        ro = ref(x, dead)
        so = sh(x[rows], dead[local])
        # The shard's pre-activations are the same dot products over d_in as the full matrix's, but computed by a
        # matmul of another shape (another BLAS blocking and summation order, by CPU and thread count): equal to
        # about D * eps64 of their magnitude, not bitwise. Indices are equal unless two pre-activations lie within
        # that rounding of each other (random float64 inputs: gaps around 1e-2, rounding around 1e-15).
        assert torch.equal(ro.latent_indices[rows], so.latent_indices)
        _close(so.latent_values, ro.latent_values[rows], VALUE_TOL, "latent_values")
        for field in ("loss", "nmse", "auxk_loss", "multik_loss"):
            _close(getattr(so, field), getattr(ro, field), 1e-6, field)
        assert float(ro.auxk_loss) > 0 and float(ro.multik_loss) > 0
        _close(so.x_hat, ro.x_hat[rows], 1e-9, "x_hat")
        ro.loss.backward()
        so.loss.backward()
        average_gradients_(sh, dp_group)
        for name in ("W_enc", "b_enc", "W_dec"):
            _close(getattr(sh, name).grad, getattr(ref, name).grad[local], 1e-6, name + ".grad")
        _close(sh.b_pre.grad, ref.b_pre.grad, 1e-6, "b_pre.grad")

        # 20 Adam steps with sharded dead-latent counters (dead after 3 global batches without firing)
        ref, sh = copy.deepcopy(full), ShardedTopKSAE.from_full(full, tp_group).train()
        if dp > 1:
            sh.batch_sum = GroupSum(dp_group)
        opt_r = torch.optim.Adam(ref.parameters(), lr=3e-3, eps=6.25e-10)
        opt_s = torch.optim.Adam(sh.parameters(), lr=3e-3, eps=6.25e-10)
        counts_r = torch.zeros(N, dtype=torch.long)
        counts_s = torch.zeros(N // tp, dtype=torch.long)
        dead_after = 3 * B

        def step_(step, sh, opt_s, counts_s, ref=None):
            x = torch.randn(B, D, generator=torch.Generator().manual_seed(100 + step)).double() * 2 + 0.5
            so = sh(x[rows], counts_s >= dead_after)
            so.loss.backward()
            average_gradients_(sh, dp_group)
            pairs = [(sh, opt_s)]
            if ref is not None:
                ro = ref(x, counts_r >= dead_after)
                ro.loss.backward()
                pairs.append((ref, opt_r))
                update_dead_counts_(counts_r, ro.latent_values, ro.latent_indices, 0, B, None, 1e-3)
            for m, opt in pairs:
                m.remove_parallel_grads_()
                opt.step()
                opt.zero_grad()
                m.normalize_decoder_()
            update_dead_counts_(counts_s, so.latent_values, so.latent_indices, sh.offset, B, dp_group, 1e-3)

        for step in range(20):
            if step == 10:  # a sharded checkpoint (each rank writes its shard) and the reference's state beside it
                save_sharded(ckdir / "ck", sh, opt_s, mesh, counts_s, extra={"step": step})
                if rank == 0:
                    torch.save(ref.state_dict(), ckdir / "ref10.pt")
            step_(step, sh, opt_s, counts_s, ref)
        assert bool((counts_r >= dead_after).any()), "no latent died: AuxK was not exercised"
        assert torch.equal(counts_s, counts_r[local])
        for name in ("W_enc", "b_enc", "W_dec"):
            _close(getattr(sh, name), getattr(ref, name)[local], 1e-5, name)
            for key in ("exp_avg", "exp_avg_sq"):
                _close(opt_s.state[getattr(sh, name)][key], opt_r.state[getattr(ref, name)][key][local], 1e-5,
                       f"{name}.{key}")
        _close(sh.b_pre, ref.b_pre, 1e-5, "b_pre")
        gathered = gather_full(sh, everywhere=True)
        for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
            _close(getattr(gathered, name), getattr(ref, name), 1e-5, "gathered " + name)

        # resume from the step-10 checkpoint on the same mesh: steps 10..19 again give the same state
        sh2 = ShardedTopKSAE(D, N, K, tp_group=tp_group, k_aux=K_AUX, multi_topk=True, multi_topk_factor=2).double()
        sh2.train()
        if dp > 1:
            sh2.batch_sum = GroupSum(dp_group)
        opt2 = torch.optim.Adam(sh2.parameters(), lr=3e-3, eps=6.25e-10)
        counts2 = torch.zeros(N // tp, dtype=torch.long)
        assert load_sharded(ckdir / "ck", sh2, opt2, mesh, counts2) == {"step": 10}
        for step in range(10, 20):
            step_(step, sh2, opt2, counts2)
        assert torch.equal(counts2, counts_s)
        for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
            _close(getattr(sh2, name), getattr(sh, name), 1e-12, "resumed " + name)
            _close(opt2.state[getattr(sh2, name)]["exp_avg_sq"], opt_s.state[getattr(sh, name)]["exp_avg_sq"],
                   1e-12, "resumed adam " + name)
        if dp == 2:  # the same checkpoint on a 1 x 4 mesh is refused before anything is loaded
            mesh4 = init_device_mesh("cpu", (1, 4), mesh_dim_names=("data", "tensor"))
            sh4 = ShardedTopKSAE.from_full(full, mesh4.get_group("tensor"))
            opt4 = torch.optim.Adam(sh4.parameters())
            with pytest.raises(ValueError, match="data_parallel_size: checkpoint 2, now 1; tensor_parallel_size: "
                                                 "checkpoint 2, now 4"):
                load_sharded(ckdir / "ck", sh4, opt4, mesh4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dp,tp", [(1, 2), (1, 4), (2, 2)])
def test_sharded_sae_equals_one_process(dp, tp, tmp_path):
    mp.spawn(_worker, args=(dp * tp, dp, tp, _free_port(), tmp_path), nprocs=dp * tp, join=True)
    # `lit-sae export` of a sharded checkpoint, in one process: one SAELens-layout SAE equal to the reference's
    from lit_sae.artifacts.export import export_sharded, load_exported

    export_sharded(tmp_path / "ck", tmp_path / "export", hook_point="blocks.0.hook_resid_post")
    sae, cfg = load_exported(tmp_path / "export")
    assert cfg["d_sae"] == N and cfg["hook_name"] == "blocks.0.hook_resid_post"
    ref = torch.load(tmp_path / "ref10.pt")
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(sae, name).double(), ref[name].double(), rtol=1e-6, atol=1e-6)
