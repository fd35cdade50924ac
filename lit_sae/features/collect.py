"""Per-latent statistics of an SAE over token contexts, streamed from sparse codes (no dense (tokens, n_latents)).

Three passes over the same batches of :class:`~lit_sae.eval.codes.CodeBatch` (each re-encodes the text; nothing
grows with the number of tokens except the list of contexts' token ids):

1. firing count, sum and max of each latent's nonzero activations; the top ``n_top`` contexts per latent (a
   context counts once, at its largest activation; ties go to the lower context id, then the earlier position);
2. a histogram of each latent's nonzero activations in ``n_bins`` equal bins of (0, max], and the activation
   bands: ``n_bands`` equal intervals of (0, max] (as SAEDashboard's "quantile" groups), ``per_band`` contexts
   sampled in each by a fixed hash of (latent, context, position), so the sample does not depend on batching;
3. for every selected context (top and bands), the latent's activation on each token of a window around the
   selected token, for highlighting.

Per-latent state is bounded: every table is (n_latents, width) and is updated with vectorised sorts and scatters
over the batch's nonzero entries only (no Python loop over latents). Bytes per latent with the defaults (n_top=20,
n_bands=10, per_band=5, n_bins=32): about 2.1 KB of state (2.0 GiB at n_latents = 2^20), plus 9.2 KB of activation
windows in pass 3 (the output's own size; 9.0 GiB at 2^20). :func:`memory_estimate` gives the figures; they are
logged before a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_sae.eval.codes import CodeBatch

__all__ = ["FeatureCollector", "FeatureStats", "memory_estimate"]

_EMPTY = -1  # context id of an empty slot in a bounded table
_P1, _P2, _P3, _M = 1_000_003, 998_244_353, 19_260_817, 2_147_483_647  # hash constants (all < 2^31)


def memory_estimate(n_latents: int, n_top: int = 20, n_bands: int = 10, per_band: int = 5, n_bins: int = 32,
                    window: int = 33) -> dict[str, int]:
    """Bytes of collector state, by table: counts/sums/max, histogram, top table, band table, windows (output)."""
    return {"counters": n_latents * (8 + 8 + 4),
            "histogram": n_latents * n_bins * 8,
            "top": n_latents * n_top * (4 + 8 + 8),
            "bands": n_latents * n_bands * per_band * (8 + 8 + 8 + 4),
            "windows": n_latents * (n_top + n_bands * per_band) * window * 4}


def _hash(lat: Tensor, ctx: Tensor, pos: Tensor, seed: int) -> Tensor:
    """A fixed pseudo-random int64 in [0, 2^31 - 1) per (latent, context, position) (no overflow in int64)."""
    h = (lat % _M) * _P1 % _M
    h = (h ^ ((ctx % _M) * _P2 % _M)) % _M
    h = (h ^ ((pos + seed) % _M * _P3 % _M)) % _M
    h = h * _P2 % _M
    return (h ^ (h >> 13)) * _P1 % _M


def _order(*keys: tuple[Tensor, bool]) -> Tensor:
    """Permutation sorting by several keys, most significant first; each key is (tensor, descending)."""
    n = keys[0][0].numel()
    perm = torch.arange(n)
    for key, desc in reversed(keys):
        perm = perm[torch.sort(key[perm], stable=True, descending=desc).indices]
    return perm


def _first_of_groups(group_sorted: Tensor) -> Tensor:
    """Bool mask of the first element of each run of equal values in a sorted tensor."""
    first = torch.ones_like(group_sorted, dtype=torch.bool)
    first[1:] = group_sorted[1:] != group_sorted[:-1]
    return first


def _merge(table: dict[str, Tensor], row: Tensor, cand: dict[str, Tensor], keys: list[tuple[str, bool]]) -> None:
    """Merge candidates into a bounded table in place, keeping each row's best ``width`` entries by ``keys``.

    ``table``: fields -> (R, width) tensors, with ``ctx == -1`` marking empty slots. ``row``: (n,) row of each
    candidate; ``cand``: fields -> (n,) tensors. Only the rows that receive candidates are touched."""
    if row.numel() == 0:
        return
    width = table["ctx"].shape[1]
    touched = torch.unique(row)
    old = {f: t[touched] for f, t in table.items()}
    keep = old["ctx"] != _EMPTY
    old_row = touched[:, None].expand(-1, width)[keep]
    rows = torch.cat([old_row, row])
    fields = {f: torch.cat([old[f][keep], cand[f].to(old[f].dtype)]) for f in table}
    perm = _order((rows, False), *[(fields[f], desc) for f, desc in keys])
    rows = rows[perm]
    starts = torch.nonzero(_first_of_groups(rows)).squeeze(1)
    counts = torch.diff(torch.cat([starts, torch.tensor([rows.numel()])]))
    rank = torch.arange(rows.numel()) - torch.repeat_interleave(starts, counts)
    sel = rank < width
    for f, t in table.items():
        t[touched] = _EMPTY if f == "ctx" else 0
        t[rows[sel], rank[sel]] = fields[f][perm][sel]


@dataclass
class FeatureStats:
    """What the collector produced (CPU tensors; L = n_latents).

    count (L,) int64 firing tokens; n_tokens: tokens encoded; sum (L,) float64; max (L,) float32 (0: never fired);
    hist (L, n_bins) int64 over (0, max] in equal bins; top_* (L, n_top): value, ctx, pos (ctx -1: empty);
    band_* (L, n_bands, per_band): value, ctx, pos; band_count (L, n_bands) nonzero activations per band;
    top_window / band_window: activations of the latent on tokens pos - before .. pos + after (zeros outside).
    """

    n_tokens: int
    count: Tensor
    sum: Tensor
    max: Tensor
    hist: Tensor
    top_value: Tensor
    top_ctx: Tensor
    top_pos: Tensor
    band_value: Tensor
    band_ctx: Tensor
    band_pos: Tensor
    band_count: Tensor
    top_window: Tensor
    band_window: Tensor
    window: tuple[int, int]

    @property
    def density(self) -> Tensor:
        """(L,) float64 fraction of encoded tokens on which each latent fires."""
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean(self) -> Tensor:
        """(L,) float64 mean nonzero activation (0 for latents that never fire)."""
        return self.sum / self.count.clamp_min(1)


class FeatureCollector:
    """Streams per-latent statistics from sparse codes; see the module docstring for the passes.

    Use: ``for b in batches(): c.pass1(b)``; then ``pass2`` over the same batches, then ``pass3``; then
    :meth:`result`. Batches must cover the same contexts in each pass (their order and size may differ).
    """

    def __init__(self, n_latents: int, *, n_top: int = 20, n_bands: int = 10, per_band: int = 5, n_bins: int = 32,
                 window: tuple[int, int] = (24, 8), seed: int = 0):
        if min(n_latents, n_top, n_bands, per_band, n_bins) <= 0:
            raise ValueError("n_latents, n_top, n_bands, per_band and n_bins must be positive")
        self.n_latents, self.n_bands, self.n_bins, self.window, self.seed = n_latents, n_bands, n_bins, window, seed
        L = n_latents
        self.n_tokens = 0
        self.count = torch.zeros(L, dtype=torch.long)
        self.sum = torch.zeros(L, dtype=torch.float64)
        self.max = torch.zeros(L, dtype=torch.float32)
        self.hist = torch.zeros(L * n_bins, dtype=torch.long)
        self.band_count = torch.zeros(L * n_bands, dtype=torch.long)
        self.top = {"value": torch.zeros(L, n_top), "ctx": torch.full((L, n_top), _EMPTY, dtype=torch.long),
                    "pos": torch.zeros(L, n_top, dtype=torch.long)}
        self.bands = {"prio": torch.zeros(L * n_bands, per_band, dtype=torch.long),
                      "ctx": torch.full((L * n_bands, per_band), _EMPTY, dtype=torch.long),
                      "pos": torch.zeros(L * n_bands, per_band, dtype=torch.long),
                      "value": torch.zeros(L * n_bands, per_band)}
        self._windows: dict[str, Tensor] = {}

    @staticmethod
    def _entries(b: CodeBatch):
        """(latent, value, ctx, pos) of every nonzero activation of encoded tokens in the batch."""
        c, t, j = torch.nonzero(b.valid[..., None] & (b.values > 0), as_tuple=True)
        return b.indices[c, t, j], b.values[c, t, j].float(), b.ctx[c], t

    def pass1(self, b: CodeBatch) -> None:
        """Counts, sums, max and the top contexts."""
        self.n_tokens += int(b.valid.sum())
        lat, val, ctx, pos = self._entries(b)
        self.count += torch.bincount(lat, minlength=self.n_latents)
        self.sum.index_add_(0, lat, val.double())
        self.max.scatter_reduce_(0, lat, val, reduce="amax")
        # one candidate per (latent, context): its largest activation (earliest position on ties)
        perm = _order((lat, False), (ctx, False), (val, True), (pos, False))
        lat, val, ctx, pos = lat[perm], val[perm], ctx[perm], pos[perm]
        first = _first_of_groups(lat * (int(b.ctx.max()) + 1) + ctx) if lat.numel() else lat.bool()
        _merge(self.top, lat[first], {"value": val[first], "ctx": ctx[first], "pos": pos[first]},
               [("value", True), ("ctx", False), ("pos", False)])

    def _bin(self, lat: Tensor, val: Tensor, n: int) -> Tensor:
        """Equal-width bin in (0, max] of each activation, among ``n`` bins (float64, the top edge in the last)."""
        frac = val.double() / self.max[lat].double()
        return (frac * n).floor().long().clamp(0, n - 1)

    def pass2(self, b: CodeBatch) -> None:
        """Histograms and the band samples (needs pass 1's max)."""
        lat, val, ctx, pos = self._entries(b)
        self.hist.index_add_(0, lat * self.n_bins + self._bin(lat, val, self.n_bins), torch.ones_like(lat))
        row = lat * self.n_bands + self._bin(lat, val, self.n_bands)
        self.band_count.index_add_(0, row, torch.ones_like(lat))
        prio = _hash(lat, ctx, pos, self.seed)
        # one candidate per (band, context): the lowest hash
        perm = _order((row, False), (ctx, False), (prio, False), (pos, False))
        row, val, ctx, pos, prio = row[perm], val[perm], ctx[perm], pos[perm], prio[perm]
        first = _first_of_groups(row * (int(b.ctx.max()) + 1) + ctx) if row.numel() else row.bool()
        _merge(self.bands, row[first], {"prio": prio[first], "ctx": ctx[first], "pos": pos[first],
                                        "value": val[first]}, [("prio", False), ("ctx", False), ("pos", False)])

    def _records(self) -> tuple[Tensor, Tensor, Tensor]:
        """(latent, ctx, pos) of every selected context: the top table's rows, then the band table's."""
        L = self.n_latents
        top_lat = torch.arange(L)[:, None].expand_as(self.top["ctx"])
        band_lat = (torch.arange(L * self.n_bands) // self.n_bands)[:, None].expand_as(self.bands["ctx"])
        return (torch.cat([top_lat.flatten(), band_lat.flatten()]),
                torch.cat([self.top["ctx"].flatten(), self.bands["ctx"].flatten()]),
                torch.cat([self.top["pos"].flatten(), self.bands["pos"].flatten()]))

    def pass3(self, b: CodeBatch) -> None:
        """The latent's activation on the window of tokens around each selected context's token."""
        if "all" not in self._windows:
            lat, ctx, pos = self._records()
            self._windows = {"all": torch.zeros(len(lat), sum(self.window) + 1), "lat": lat, "ctx": ctx, "pos": pos}
        w = self._windows
        local = torch.full((int(b.ctx.max()) + 1,), -1, dtype=torch.long)
        local[b.ctx] = torch.arange(len(b.ctx))
        ctx = w["ctx"]
        hit = (ctx >= 0) & (ctx <= int(b.ctx.max()))
        hit[hit.clone()] = local[ctx[hit]] >= 0
        before, after = self.window
        T = b.values.shape[1]
        for r in torch.nonzero(hit).squeeze(1).split(4096):  # bounded temporaries: (4096, W, k)
            t = w["pos"][r, None] + torch.arange(-before, after + 1)  # (R, W)
            inside = (t >= 0) & (t < T)
            c = local[ctx[r]][:, None].expand_as(t)
            tc = t.clamp(0, T - 1)
            match = (b.indices[c, tc] == w["lat"][r, None, None]) & b.valid[c, tc][..., None]
            w["all"][r] = ((b.values[c, tc] * match).sum(-1) * inside).float()

    def result(self) -> FeatureStats:
        """The collected statistics (call after the three passes)."""
        L, n_top = self.n_latents, self.top["ctx"].shape[1]
        per_band = self.bands["ctx"].shape[1]
        windows = self._windows.get("all", torch.zeros(L * (n_top + self.n_bands * per_band), sum(self.window) + 1))
        W = windows.shape[1]
        return FeatureStats(
            n_tokens=self.n_tokens, count=self.count, sum=self.sum, max=self.max,
            hist=self.hist.view(L, self.n_bins), top_value=self.top["value"], top_ctx=self.top["ctx"],
            top_pos=self.top["pos"], band_value=self.bands["value"].view(L, self.n_bands, per_band),
            band_ctx=self.bands["ctx"].view(L, self.n_bands, per_band),
            band_pos=self.bands["pos"].view(L, self.n_bands, per_band),
            band_count=self.band_count.view(L, self.n_bands),
            top_window=windows[:L * n_top].view(L, n_top, W),
            band_window=windows[L * n_top:].view(L, self.n_bands, per_band, W), window=self.window)
