"""A quiet console: silence third-party messages that do not concern a lit-sae user (targeted, not blanket)."""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category, module regex): each names one message and why it does not apply.
IGNORED_WARNINGS = (
    # Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated pytree API (nothing a user can change).
    (r".*isinstance\(treespec, LeafSpec\)", DeprecationWarning, r"lightning\..*"),
    (r".*isinstance\(treespec, LeafSpec\)", Warning, r"lightning\..*"),
    # lit-sae's streams are IterableDatasets with a known per-rank length; Lightning's hint targets map datasets.
    (r".*IterableDataset.*__len__.*", UserWarning, r".*"),
    (r".*Your `IterableDataset` has `__len__` defined.*", UserWarning, r".*"),
    # The run folder is the run: lit-sae checks it itself (lit_sae.train.runs), Lightning's generic notice is noise.
    (r".*Checkpoint directory .* exists and is not empty.*", UserWarning, r".*"),
    # Replaced by lit-sae's own one-line note naming the precision actually used (trainer_cli._say_if_substituted).
    (r".*is not supported on CPU. Using `precision=.*", UserWarning, r".*"),
    # lit-sae's DataModules read in-process by default on small machines (num_workers 0 is a measured choice).
    (r".*does not have many workers which may be a bottleneck.*", UserWarning, r".*"),
)


def quiet_third_party() -> None:
    """Install the targeted warning filters above and hide LitLogger / Lightning's product tips."""
    for message, category, module in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("LIGHTNING_DISABLE_TIPS", "1")  # hypothetical opt-out; harmless where unsupported
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())


class _NoAdverts(logging.Filter):
    """Drops Lightning's product advertisement lines (e.g. the LitLogger / Lightning AI tip)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("litlogger" in text.lower() or "lightning.ai" in text.lower() or "💡" in text)
