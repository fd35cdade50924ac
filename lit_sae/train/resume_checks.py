"""Checkpoint hooks of ``SAEModule``: refuse diverged weights and incompatible configs, carry the RNG states, apply
a changed learning rate on resume (a mixin, so the LightningModule keeps to the optimisation recipe)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from lit_sae.sae import activations
from lit_sae.sae.config import RESUME_KEYS
from lit_sae.train.rng_state import nonfinite_entries, rng_states, set_rng_states
from lit_sae.train.schedule import threshold_lr_scale_of

log = logging.getLogger(__name__)

# Settings a checkpoint's weights and state are tied to: a resume with other values is refused (it would either fail
# on tensor shapes or silently train another model on other data). Every other setting may change on resume. The
# SAE's are marked in lit_sae.sae.config.SAEConfig (RESUME_KEYS); the data's two are named here.
RESUME_MUST_MATCH = (*RESUME_KEYS, "hook_point", "lm_name")


class ResumeChecks:
    """Mixed into ``SAEModule`` (needs ``hparams``, ``lr``, ``global_step``, ``_trainer``; sets ``_resumed_rng``)."""

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write diverged weights; add the RNG states (the rest of the state is saved by Lightning)."""
        bad = nonfinite_entries(checkpoint)
        if bad:
            raise FloatingPointError(
                f"the weights diverged: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN/Inf at step "
                f"{self.global_step}, so no checkpoint is written and the last one on disk is still good; resume "
                "from it with a lower learning rate: `lit-sae fit --config ... --ckpt_path last --model.lr X`"
            )
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that a resumed checkpoint fits this config, before its weights are loaded; apply a changed lr;
        take the dead-latent counters of a checkpoint written when a callback held them."""
        saved = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if saved is not None:
            self._check_compatible(dict(saved))
            self._apply_optimizer_changes(dict(saved), checkpoint)
        self._resumed_rng = checkpoint.get("rng_states")
        state = checkpoint.get("state_dict", {})
        if "tokens_since_fired" not in state and "sae.W_dec" in state:
            old = (checkpoint.get("callbacks", {}).get("DeadLatentTracker") or {}).get("tokens_since_fired")
            state["tokens_since_fired"] = (old.clone() if old is not None
                                           else torch.zeros(state["sae.W_dec"].shape[0], dtype=torch.long))

    def _checkpoint_name(self) -> str:
        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        return str(path) if path else "the checkpoint"

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        now = dict(self.hparams)
        diff = {key: (saved.get(key), now.get(key)) for key in RESUME_MUST_MATCH
                if not _same_setting(key, saved.get(key), now.get(key))}
        if (saved.get("ema_decay") is None) != (now.get("ema_decay") is None):
            diff["ema_decay"] = (saved.get("ema_decay"), now.get("ema_decay"))
        if diff:
            desc = "; ".join(f"model.{key}: checkpoint {a!r}, config {b!r}" for key, (a, b) in diff.items())
            linked = sorted({"d_in", "hook_point", "lm_name"} & set(diff))
            hint = (f" ({', '.join('model.' + k for k in linked)} come from the data's manifest: use the checkpoint's "
                    "shard folder)" if linked else "")
            raise ValueError(
                f"{self._checkpoint_name()} was written by a run with another model config ({desc}){hint}. Resume "
                "with the config that wrote it, or start a new run without --ckpt_path in another checkpoint folder"
            )
        changed = sorted(k for k in now if k not in RESUME_MUST_MATCH and k in saved and not _same(saved[k], now[k]))
        if changed:
            log.warning("resuming %s with changed settings (the new values apply from here on): %s",
                        self._checkpoint_name(), ", ".join(f"model.{k}: {saved[k]!r} -> {now[k]!r}" for k in changed))

    def _apply_optimizer_changes(self, saved: dict[str, Any], checkpoint: dict[str, Any]) -> None:
        """Lightning restores the optimizer's lr, betas and eps from the checkpoint, which would silently ignore a
        changed ``model.lr`` (the usual fix after a divergence): rewrite the saved values to this config's."""
        old_lr = self.default_lr_of(saved)  # the saved lr, the law for null, the law (pre-sweep) for auto
        ratio = self.lr / old_lr
        # jumprelu's second group (its thresholds) also follows a changed jumprelu_threshold_lr_scale
        ratios = [ratio, ratio * threshold_lr_scale_of(self.hparams.get("jumprelu_threshold_lr_scale"))
                  / threshold_lr_scale_of(saved.get("jumprelu_threshold_lr_scale"))]
        for state in checkpoint.get("optimizer_states", []):
            for i, group in enumerate(state.get("param_groups", [])):
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = group[key] * ratios[min(i, 1)]
                group["betas"] = tuple(self.hparams.betas)
                group["eps"] = self.hparams.eps
        if ratios != [1.0, 1.0]:
            for sched in checkpoint.get("lr_schedulers", []):
                for key in ("base_lrs", "_last_lr"):
                    if key in sched:
                        sched[key] = [v * ratios[min(i, 1)] for i, v in enumerate(sched[key])]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """After a resume, continue the random streams where the checkpoint left them (at the first step)."""
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Equality of one hyperparameter across a checkpoint round trip: YAML turns tuples into lists, and an
    activation may be spelled by its alias."""
    if key == "activation" and isinstance(a, str) and isinstance(b, str):
        return activations.ALIASES.get(a, a) == activations.ALIASES.get(b, b)
    return _same(a, b)


def _same(a: Any, b: Any) -> bool:
    """Equality of hyperparameters across a checkpoint round trip, where YAML turns tuples into lists."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
