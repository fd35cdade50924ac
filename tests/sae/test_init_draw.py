"""The decoder's initial draw (``lit_sae.sae.init.draw_decoder``) is the same whether a process keeps all rows or a
shard keeps its own: what lets a latent-sharded SAE start where one process starts (``lit_sae.parallel.sharding``)."""

import pytest
import torch

from lit_sae.sae import init as sae_init
from lit_sae.sae.init import draw_decoder
from lit_sae.sae.model import TopKSAE


@pytest.mark.parametrize("n,d,shards", [(64, 8, 2), (96, 5, 4), (30, 7, 3)])
def test_shard_rows_equal_the_full_draw(monkeypatch, n, d, shards):
    monkeypatch.setattr(sae_init, "DRAW_ROWS", 16)  # several blocks, some cut by shard boundaries
    full = draw_decoder(n, d, generator=torch.Generator().manual_seed(7))
    assert full.shape == (n, d) and torch.allclose(full.norm(dim=1), torch.ones(n))
    step = n // shards
    for t in range(shards):
        rows = slice(t * step, (t + 1) * step)
        # the same generator state, only rows kept: bit-equal (the same kernel on the same blocks)
        assert torch.equal(draw_decoder(n, d, rows, torch.Generator().manual_seed(7)), full[rows])


def test_topksae_on_meta_keeps_the_rng_state_of_its_draw():
    torch.manual_seed(3)
    one = TopKSAE(8, 64, 4)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = TopKSAE(8, 64, 4)
    assert meta.W_dec.is_meta and one.init_rng_state is None
    g = torch.Generator()
    g.set_state(meta.init_rng_state)
    assert torch.equal(draw_decoder(64, 8, slice(32, 64), g), one.W_dec.detach()[32:])
