"""The memory model's arithmetic against a hand count, and the layout checks' messages (no processes needed)."""

import pytest

from lit_sae.parallel.memory import ACT_COPIES, gpus_needed, plan_memory
from lit_sae.parallel.tensor import check_mesh, check_shardable
from lit_sae.sae.kernels import MAX_PREACT_BYTES, MAX_PREACT_BYTES_CUDA


def test_plan_counts_by_hand():
    # d 512, n 16384 over T=2 (8192 rows each), global batch 4096 over D=2 (2048 per device), fp32
    plan = plan_memory(512, 16384, 32, 4096, data_parallel_size=2, tensor_parallel_size=2)
    params = (2 * 8192 * 512 + 8192 + 512) * 4
    assert plan.weights == plan.gradients == params and plan.adam == 2 * params and plan.ema == 0
    assert plan.preact == 2048 * 8192 * 4  # 64 MiB: one chunk holds the whole per-device batch
    # the activations after the encoder product are the global batch's on every rank (the codes are gathered)
    assert plan.batch == ACT_COPIES * 4096 * 512 * 4 + 4096 * 32 * 2 * (4 + 8) * 2
    summed = plan_memory(512, 16384, 32, 4096, data_parallel_size=2, tensor_parallel_size=2, gathers=False)
    assert summed.batch == ACT_COPIES * 2048 * 512 * 4 + 2048 * 32 * 2 * (4 + 8) * 2
    assert plan.peak == 3 * params + plan.batch + max(plan.preact, params)  # preact is freed before the gradients
    # a wide shard: the chunk stays under MAX_PREACT_BYTES
    wide = plan_memory(512, 2**22, 32, 4096)
    assert wide.preact == (MAX_PREACT_BYTES // (2**22 * 4)) * 2**22 * 4
    # on CUDA the chunk budget is larger (fewer top-k launches): 2 GiB of bf16 at 2^22 latents is 256 rows
    wide_cuda = plan_memory(512, 2**22, 32, 4096, compute_dtype="bfloat16", device="cuda")
    assert wide_cuda.preact == (MAX_PREACT_BYTES_CUDA // (2**22 * 2)) * 2**22 * 2 == 256 * 2**22 * 2


def test_gpus_needed_for_16m_latents_on_80gb():
    # 16M x 4096 fp32: 2 TiB of weights + gradients + Adam; 32 x 80 GB devices at 16k tokens per replica
    assert gpus_needed(4096, 2**24, 32, 16384, 80 * 10**9, compute_dtype="bfloat16") == 32


def test_layout_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"model.n_latents=100 is not divisible by tensor_parallel_size=8"):
        check_shardable(100, 8)
    with pytest.raises(ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=3 must equal the number of "
                                         r"processes \(4 = trainer.devices x trainer.num_nodes\)"):
        check_mesh(4, 2, 3)
    check_mesh(4, 2, 2)
    with pytest.raises(ValueError, match=r"batch_size_tokens=1000 does not split over data_parallel_size=3"):
        plan_memory(64, 128, 4, 1000, data_parallel_size=3)
