"""``model.lr: auto``: choose the learning rate on the first tokens of the run, then continue with the best SAE.

The first ``lr_auto_fraction`` of the run's optimizer steps train one candidate SAE per learning rate of a log grid
around the paper's law (``default_lr(n_latents)`` x ``lr_auto_multipliers``, default x0.5 .. x8), side by side on the
same batches: every batch is read once and every candidate takes its own step on it (one Adam, one parameter group per
candidate, as ``SAESweepModule``; the candidates share no parameter, so each one's gradient and Adam state are
exactly those of a run of its own). All candidates start from the same initial weights.

Choice: the candidate with the lowest mean training NMSE over the last half of the sweep's steps. Each of those
batches is scored *before* the step that trains on it, so on a first pass over the data this is an error on tokens
the candidate has not trained on (progressive validation): the same information as a held-out slice, without
holding tokens back from training, and paired (every candidate scored on the same tokens), so the noise of the
comparison is the per-batch difference between candidates, not the spread of the batches. Under DDP the training
NMSE is the global batch's (``lit_sae.parallel.data_parallel``), so every rank computes the same scores; the choice
is still broadcast from rank 0.

At the end of the sweep the winner's weights, dead-latent counters and Adam state (moments and step count) become
the module's ``sae`` and its optimizer state, and its learning rate the main parameter group's: the run continues
exactly as a run at that learning rate from the start (the sweep's tokens count toward the run). The other
candidates' Adam state is freed; their weights stay allocated (4 bytes per parameter each) and are left out of
checkpoints written after the sweep.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lit_sae.parallel.data_parallel import data_parallel_size
from lit_sae.train.schedule import run_length

log = logging.getLogger(__name__)

#: Multiples of the paper's law tried by ``lr: auto``: the law is about 2x too small on the embedded default
#: (docs/recipe.md), and larger multiples diverge or lose; a factor 2 between points.
LR_AUTO_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Fraction of the run's optimizer steps spent on the sweep.
LR_AUTO_FRACTION = 0.1
CANDIDATES = "lr_search.candidates."


def check_lr(lr, multipliers: Sequence[float], fraction: float) -> None:
    """ValueError naming the key for an lr that is neither positive, null nor ``auto``, and for a bad grid or
    fraction."""
    if isinstance(lr, str):
        if lr != "auto":
            raise ValueError(f"model.lr={lr!r}: give a positive number, null (the paper's law) or auto")
    elif lr is not None and not lr > 0:
        raise ValueError(f"model.lr={lr} must be positive (or null for the paper's default, or auto)")
    if not multipliers or any(not m > 0 for m in multipliers) or len(set(multipliers)) != len(multipliers):
        raise ValueError(f"model.lr_auto_multipliers={list(multipliers)}: give distinct positive multiples of the "
                         "paper's lr, e.g. [0.5, 1, 2, 4, 8]")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"model.lr_auto_fraction={fraction} must be in (0, 1): the share of the run's steps "
                         "spent on the learning-rate sweep")


class LRSearch(nn.Module):
    """The candidates of an ``lr: auto`` sweep and its state (all buffers: saved and restored with the weights).

    Args:
        sae: the module's SAE; each candidate is a copy of it (weights replaced by ``start_`` at fit start).
        lrs: one learning rate per candidate.
    Buffers: ``tokens_since_fired`` (m, n_latents) int64, each candidate's dead-latent counters; ``score_sum`` (m,)
    float64, the summed NMSE of the scored steps; ``scored_steps``, ``chosen`` (-1 until the sweep ends) and
    ``planned_steps`` (the sweep's length, fixed at its first step: a resume with another max_steps keeps it) int64.
    """

    def __init__(self, sae: nn.Module, lrs: Sequence[float]):
        super().__init__()
        self.lrs = [float(lr) for lr in lrs]
        self.candidates = nn.ModuleList(copy.deepcopy(sae) for _ in self.lrs)
        m = len(self.lrs)
        self.register_buffer("tokens_since_fired", torch.zeros(m, sae.n_latents, dtype=torch.long))
        self.register_buffer("score_sum", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("scored_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("chosen", torch.full((), -1, dtype=torch.long))
        self.register_buffer("planned_steps", torch.zeros((), dtype=torch.long))  # 0 until the first step

    @property
    def done(self) -> bool:
        return int(self.chosen) >= 0

    @staticmethod
    def sweep_steps(total_steps: int, fraction: float) -> int:
        """Optimizer steps of the sweep: ``fraction`` of the run, at least 2 (one scored), at most the run."""
        return min(total_steps, max(2, round(fraction * total_steps)))

    @torch.no_grad()
    def start_(self, sae: nn.Module) -> None:
        """Every candidate starts from ``sae``'s weights and buffers (after its data initialisation)."""
        for cand in self.candidates:
            cand.load_state_dict(sae.state_dict())

    def scores(self) -> Tensor:
        """(m,) float64 mean scored NMSE per candidate (inf before any scored step)."""
        n = int(self.scored_steps)
        return self.score_sum / n if n else torch.full_like(self.score_sum, float("inf"))

    @torch.no_grad()
    def record(self, nmse: Sequence[Tensor], step: int, sweep_steps: int) -> None:
        """Add each candidate's NMSE of this step (before its update) when ``step`` is in the scored last half."""
        if step >= sweep_steps - max(1, sweep_steps // 2):
            self.score_sum += torch.stack([v.detach().to(torch.float64) for v in nmse]).to(self.score_sum.device)
            self.scored_steps += 1

    @torch.no_grad()
    def choose_(self, sae: nn.Module, dead_counts: Tensor, optimizer, scheduler, broadcast) -> float:
        """End the sweep: the best candidate's weights into ``sae``, its counters into ``dead_counts``, its Adam state
        and learning rate (per parameter group, scheduler base included) into ``sae``'s groups (the optimizer's first
        ``g`` groups; candidate i holds groups g(i+1) .. g(i+2)-1); frees the candidates' Adam state. ``broadcast``:
        the strategy's (rank 0's choice holds everywhere). Returns the chosen learning rate."""
        best = int(broadcast(torch.argmin(self.scores()).reshape(1).cpu(), src=0)[0])
        winner = self.candidates[best]
        sae.load_state_dict(winner.state_dict())
        dead_counts.copy_(self.tokens_since_fired[best])
        groups = optimizer.param_groups
        g = len(groups) // (len(self.candidates) + 1)
        for j in range(g):
            src, dst = groups[g * (best + 1) + j], groups[j]
            for p_src, p_dst in zip(src["params"], dst["params"]):
                state = optimizer.state.pop(p_src, None)
                if state is not None:
                    optimizer.state[p_dst] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for key in ("lr", "initial_lr"):
                if key in src:
                    dst[key] = src[key]
            if scheduler is not None:
                scheduler.base_lrs[j] = scheduler.base_lrs[g * (best + 1) + j]
        for cand in self.candidates:
            for p in cand.parameters():
                optimizer.state.pop(p, None)
                p.grad = None
        self.chosen.fill_(best)
        return self.lrs[best]

    def table(self) -> str:
        """One line per candidate: its lr and score, the chosen one marked."""
        scores = self.scores().tolist()
        return "; ".join(f"{lr:.3g}: {s:.4f}{' (chosen)' if i == int(self.chosen) else ''}"
                         for i, (lr, s) in enumerate(zip(self.lrs, scores)))


class LRAutoHooks:
    """``SAEModule``'s part of ``lr: auto`` (a mixin: it uses the module's ``sae``, ``lr_search``, counters and
    Lightning's ``log``). Checkpoints written after the sweep leave the candidates' weights out; a resume checks
    that the sweep's settings are the checkpoint's."""

    def lr_sweep_steps(self) -> int:
        """Optimizer steps of ``lr: auto``'s sweep (``lr_auto_fraction`` of the run; ValueError if its length is
        unknown)."""
        planned = self.lr_search.planned_steps
        if int(planned) == 0:
            total = run_length(self._trainer, "model.lr=auto")
            planned.fill_(LRSearch.sweep_steps(total, self.hparams.lr_auto_fraction))
        return int(planned)

    def _sweep_step(self, x: Tensor) -> dict[str, Tensor]:
        """One step of every candidate on the same batch (their losses summed: they share no parameter)."""
        search = self.lr_search
        total, nmse, outs = x.new_zeros((), dtype=torch.float32), [], []
        metrics = {}
        for i, (cand, lr) in enumerate(zip(search.candidates, search.lrs)):
            counts = search.tokens_since_fired[i]
            out = cand(x, counts >= self.hparams.dead_after_tokens)
            if not torch.isfinite(out.loss):  # a too-large lr: this candidate loses, the others go on
                out = out._replace(loss=out.loss.new_zeros(()).requires_grad_(), nmse=out.nmse.new_tensor(1e30))
            self._count_fired_(out.latent_values.detach(), out.latent_indices, counts)
            total = total + out.loss
            nmse.append(out.nmse)
            outs.append(out)
            metrics[f"lr_auto/train_nmse/lr_{lr:.3g}"] = out.nmse
        search.record(nmse, self.global_step, self.lr_sweep_steps())
        self.tokens_seen += x.shape[0] * data_parallel_size(self.trainer)
        self.log_dict(metrics)
        self.log("train/tokens_seen", self.tokens_seen.float(), reduce_fx="max")
        lead = outs[int(torch.argmin(torch.stack([v.detach() for v in nmse])))]
        return {"loss": total, "latent_values": lead.latent_values.detach(), "latent_indices": lead.latent_indices}

    def _choose_lr(self) -> None:
        """End ``lr: auto``'s sweep: the best candidate becomes the module's SAE, optimizer state and lr."""
        search = self.lr_search
        if self._trainer is not None and self.trainer.optimizers:
            opt, sched = self.trainer.optimizers[0], self.lr_schedulers()
            broadcast = self.trainer.strategy.broadcast
        else:  # the fit ends inside the sweep: only the weights matter
            opt, sched, broadcast = torch.optim.SGD([torch.zeros(1)]), None, lambda t, src=0: t
            opt.param_groups = [{"params": []}]
        self.lr = search.choose_(self.sae, self.tokens_since_fired, opt, sched, broadcast)
        log.info("model.lr=auto chose lr %.3g (mean training NMSE over the last %d sweep steps, measured before each "
                 "step: %s)", self.lr, int(search.scored_steps), search.table())
        if self._trainer is not None and self.trainer.logger is not None:
            scores = search.scores().tolist()
            metrics = {f"lr_auto/score/lr_{lr:.3g}": s for lr, s in zip(search.lrs, scores)}
            self.trainer.logger.log_metrics({**metrics, "lr_auto/chosen_lr": self.lr}, step=self.global_step)

    def _candidates_step_(self, fn: str) -> None:
        if self.lr_search is not None and not self.lr_search.done:
            for cand in self.lr_search.candidates:
                getattr(cand, fn)()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lr_search is not None and self.lr_search.done:
            drop_candidates(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = dict(checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY) or {})
        if saved:
            now = dict(self.hparams)
            keys = ("lr_auto_multipliers", "lr_auto_fraction") if now.get("lr") == "auto" else ()
            diff = [f"model.{key}: checkpoint {saved.get(key)!r}, config {now.get(key)!r}" for key in keys
                    if saved.get(key, now[key]) != now[key]]
            if (saved.get("lr") == "auto") != (now.get("lr") == "auto"):
                diff.insert(0, f"model.lr: checkpoint {saved.get('lr')!r}, config {now.get('lr')!r}")
            if diff:
                raise ValueError(f"{self._checkpoint_name()}: lr auto's sweep cannot change on resume ("
                                 f"{'; '.join(diff)}): resume with the config that wrote it, or start a new run")
        state = checkpoint.get("state_dict", {})
        if self.lr_search is not None and int(state.get("lr_search.chosen", -1)) >= 0:
            restore_candidates(state, self)
        super().on_load_checkpoint(checkpoint)


def drop_candidates(state_dict: dict) -> None:
    """Remove the candidates' weights from a checkpoint's ``state_dict`` (after the sweep they are never used)."""
    for key in [k for k in state_dict if k.startswith(CANDIDATES)]:
        del state_dict[key]


def restore_candidates(state_dict: dict, module: nn.Module) -> None:
    """Fill the candidates' weights a checkpoint left out (``drop_candidates``) with zeros of ``module``'s shapes, so
    that the strict load of a checkpoint written after the sweep succeeds."""
    for key, value in module.state_dict().items():
        if key.startswith(CANDIDATES) and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)


def base_lr(lr, n_latents: int, default_lr) -> Optional[float]:
    """The number an ``lr`` setting gives before any sweep: ``lr``, the law for null, the law (the grid's centre)
    for ``auto``."""
    return default_lr(n_latents) if lr is None or lr == "auto" else float(lr)
