"""The test table of a sweep: one row per SAE (settings, NMSE, L0, dead fraction and, from its evaluation report,
delta CE, probe loss, ablation sparsity and explainability), written as ``sweep_test.json`` and ``sweep_test.md``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from lit_sae.fsync import atomic_write
from lit_sae.safe_io import dumps_json

log = logging.getLogger(__name__)

#: Columns of the sweep test table: (row key, header, format); a column shows when any row has its value.
TABLE_COLUMNS = (
    ("name", "SAE", "{}"), ("activation", "activation", "{}"), ("n_latents", "n_latents", "{}"), ("k", "k", "{}"),
    ("lr", "lr", "{:.3g}"), ("nmse", "NMSE", "{:.4f}"), ("l0", "L0", "{:.1f}"), ("dead_fraction", "dead", "{:.3f}"),
    ("delta_ce", "delta CE", "{:.4f}"), ("frac_recovered", "CE recovered", "{:.3f}"),
    ("probe_ce", "probe CE", "{:.4f}"), ("ablation_sparsity", "ablation sparsity", "{:.3f}"),
    ("explain_precision", "N2G precision", "{:.3f}"), ("explain_recall", "N2G recall", "{:.3f}"),
    ("report", "report", "{}"),
)


def table_row(module, spec: dict[str, Any], report: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The table row of SAE ``spec`` of the ``SAESweepModule`` ``module``: its settings, test NMSE / L0 (the
    report's when given, else the module's test metrics), dead fraction (the report's test-split density when given,
    else the training counters), and from the report delta CE, fraction of CE recovered, mean probe CE of the best
    latent, ablation sparsity and mean N2G precision / recall (None where the report lacks them)."""
    name = spec["name"]
    row: dict[str, Any] = {"name": name, "activation": spec.get("activation", "topk"),
                           "n_latents": int(spec["n_latents"]), "k": int(spec["k"]), "lr": module.lr_of(spec)}
    if report is None:
        nmse, l0 = module.test_metrics[name]
        row.update(nmse=float(nmse.compute()), l0=float(l0.compute()),
                   dead_fraction=float(module.dead_latent_mask(name).float().mean()))
        return row
    m, d = report.get("metrics", {}), report.get("downstream") or {}
    p, a, e = report.get("probes") or {}, report.get("ablation") or {}, report.get("explainability") or {}
    row.update(nmse=m.get("nmse"), l0=m.get("l0"), dead_fraction=m.get("dead_fraction"),
               dead_fraction_training=float(module.dead_latent_mask(name).float().mean()),
               delta_ce=d.get("delta_ce"), frac_recovered=d.get("frac_recovered"), probe_ce=p.get("mean_sae_ce"),
               ablation_sparsity=a.get("mean"), explain_precision=e.get("mean_precision"),
               explain_recall=e.get("mean_recall"))
    return row


def write_test_table(root: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` to ``root/sweep_test.json`` (everything) and ``root/sweep_test.md`` (the ``TABLE_COLUMNS``
    that any row has), each through a temporary file and a rename."""
    root.mkdir(parents=True, exist_ok=True)
    cols = [c for c in TABLE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols)
                     + " |")
    for path, text in ((root / "sweep_test.json", dumps_json(rows, nonfinite="null", indent=2)),
                       (root / "sweep_test.md", "\n".join(lines) + "\n")):
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)
    log.info("sweep test table written to %s", root / "sweep_test.md")
