"""``lit-sae reproduce --quick`` end to end on the tiny LM's harvest: every figure and number is produced, and the
reported fits agree with the reported per-SAE numbers."""

import json
import math

import numpy as np
import pytest

from lit_sae.cli.main import main
from lit_sae.reproduce.figures import FIGURES
from lit_sae.reproduce.run import reproduce
from tests.support.tiny_lm import harvest_tiny

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

VERDICTS = ("yes", "no", "partly", "n/a")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = harvest_tiny(tmp_path_factory.mktemp("repro"))
    out = root / "run"
    md = reproduce(str(root / "shards"), str(out), quick=True, progress=False)
    return root, out, md


def test_every_figure_and_number(quick_run):
    root, out, md = quick_run
    assert md == str(out / "reproduce.md")
    r = json.loads((out / "reproduce.json").read_text())
    for name in FIGURES:
        png = out / r["figures"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    assert [c["claim"][:2] for c in r["claims"]] == ["1.", "2.", "3a", "3b", "4.", "5.", "6."]
    for c in r["claims"]:
        assert c["verdict"].split(" ")[0] in VERDICTS and c["paper"] and c["measured"]
    groups = r["groups"]
    every = {n for names in groups.values() for n in names}
    assert every == set(r["saes"]) and len(every) == r["n_saes"]
    for name, s in r["saes"].items():
        assert 0 < s["nmse"] < 3 and s["l0"] > 0 and 0 <= s["dead_fraction"] <= 1, name
        assert math.isfinite(s["delta_ce"]) and s["sae_ce"] == pytest.approx(r["clean_ce"] + s["delta_ce"])
        if s["activation"] == "topk":
            assert s["l0"] <= s["k"] + 1e-9
    for name in groups["sizes"]:
        assert math.isfinite(r["saes"][name]["probe_ce"]) and math.isfinite(r["saes"][name]["probe_raw_ce"])
    for name in groups["ablation"]:
        a = r["saes"][name]["ablation"]
        assert a["n_latents"] > 0 and a["window"] == 16
        assert all(0 < a[k] <= 1 for k in ("mean", "basis_mean", "random_mean"))
    plain, multi = groups["multi"]
    k = r["setting"]["k_ref"]
    assert set(r["multi_topk"][multi]) == {str(k), str(2 * k), str(4 * k)}
    assert r["multi_topk"][plain][str(k)] == pytest.approx(r["saes"][plain]["nmse"], rel=1e-9)
    # The size law's fit, redone from the reported numbers.
    ns = [r["saes"][n]["n_latents"] for n in groups["sizes"]]
    slope = np.polyfit(np.log(ns), np.log([r["saes"][n]["nmse"] for n in groups["sizes"]]), 1)[0]
    assert r["size_fit"]["exponent"] == pytest.approx(slope, rel=1e-9)
    assert len(set(ns)) >= 5
    text = (out / "reproduce.md").read_text()
    assert all(f"figures/{n}.png" in text for n in FIGURES) and "| 6. Ablation sparsity vs k |" in text
    assert r["timing"]["total_s"] > 0 and r["train_tokens_per_sae"] >= r["harvest_train_tokens"]


def test_refuses_to_overwrite_and_bad_harvest(quick_run, tmp_path, capsys):
    root, out, _ = quick_run
    with pytest.raises(FileExistsError, match="--overwrite"):
        reproduce(str(root / "shards"), str(out), quick=True, progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", str(tmp_path / "nothing"), str(tmp_path / "run"), "--quick"])
    assert exc.value.code == 2 and "no manifest.json" in capsys.readouterr().err
