"""``lit-sae explain`` as a user runs it, on a tiny harvest with an OpenAI-compatible fake server: its outputs, the
browser data, its one-line errors, and a run interrupted by SIGINT that resumes without asking anything twice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_sae.autointerp.cache import request_key
from lit_sae.cli.main import main
from tests.autointerp.test_oracle import oracle
from tests.support.fake_openai import FakeOpenAI, free_port_url
from tests.support.tiny_lm import harvest_tiny

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder: shards/ of a tiny LM and sae/ (an exported random TopK SAE, 48 latents, k 4)."""
    from lit_sae.artifacts.export import export_sae
    from lit_sae.sae.model import TopKSAE

    root = harvest_tiny(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    export_sae(TopKSAE(32, 48, 4), root / "sae", hook_point="blocks.0.hook_resid_post", lm_name=str(root / "lm"))
    return root


def args(run, url, *extra):
    return ["explain", "--ckpt_path", str(run / "sae"), "--split", "test", "--n", "6", "--progress", "false",
            "--backend.kind", "openai", "--backend.base_url", url, "--backend.model", "fake-model",
            "--backend.concurrency", "2", "--examples.n_test", "4", "--examples.n_negative", "4", *extra]


def generic(messages):
    """Explainer: the first marked token; judge: the oracle's rule."""
    return oracle()(messages)


def test_cli_outputs_and_browser_data(run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_sae.eval.report import write_report

    write_report(run, {"metrics": {"nmse": 0.2, "n_tokens": 100}})  # a run's report, as `lit-sae test` leaves it
    browser = run / "features"
    (browser / "data").mkdir(parents=True, exist_ok=True)
    (browser / "js").mkdir(exist_ok=True)
    (browser / "data" / "summary.json").write_text("{}")
    out = tmp_path / "ai"
    with FakeOpenAI(generic, models=("fake-model", "other-model")) as srv:
        main(args(run, srv.url, "--out_dir", str(out), "--reference.kind", "openai", "--reference.base_url", srv.url,
                  "--reference.model", "other-model", "--reference_n", "3"))
    assert capsys.readouterr().out.strip() == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "lit-sae-autointerp/1" and len(res["latents"]) == 6
    s = res["summary"]
    assert s["backend"] == {"kind": "openai", "model": "fake-model", "base_url": srv.url}
    assert s["n_latents"] == 6 and s["text"]["split"] == "test"
    scored = [r for r in res["latents"] if r["status"] == "ok"]
    assert scored and all(r["detection"]["n"] >= 1 and r["fuzz"]["n"] >= 1 for r in scored)
    ex = json.loads((out / "explanations.json").read_text())
    assert ex["format"] == "lit-sae-explanations/1"
    assert {e["index"] for e in ex["explanations"]} == {str(r["latent"]) for r in res["latents"] if r["explanation"]}
    row = ex["explanations"][0]
    assert row["layer"] == "blocks.0.hook_resid_post" and row["explanationModelName"] == "fake-model"
    delphi = list((out / "delphi" / "explanations").glob("blocks.0.hook_resid_post_latent*.txt"))
    assert len(delphi) == len(ex["explanations"]) and isinstance(json.loads(delphi[0].read_text()), str)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    det = s["detection"]["accuracy"]
    assert acc.Scalars("autointerp/detection/mean")[0].value == pytest.approx(det["mean"], rel=1e-6)
    assert "autointerp/fuzz/frac_ge_0.8" in acc.Tags()["scalars"]
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"]["nmse"] == 0.2 and report["autointerp"]["detection"]["accuracy"]["n"] == det["n"]
    md = (run / "report.md").read_text()
    assert "## Autointerp" in md and "openai `fake-model`" in md and "fraction >= 0.8" in md
    # the reference backend (the same oracle under another model name) agrees with the first one
    ref = s["reference"]
    assert ref["backend"]["model"] == "other-model" and ref["n_latents"] == min(3, len(scored))
    assert ref["detection"]["sample_agreement"] == 1.0 and ref["detection"]["n_samples"] > 0
    assert "Reference backend openai `other-model`" in md
    page = json.loads((browser / "data" / "autointerp.json").read_text())
    assert set(page["latents"]) == {str(r["latent"]) for r in res["latents"]}
    assert (browser / "js" / "autointerp.js").read_text().startswith("LITSAE.autointerp(")
    sample = scored[0]["samples"]["detection"][0]
    assert all(str(t) in page["vocab"] for t in sample["tokens"])


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args(run, free_port_url(), "--out_dir", str(tmp_path / "x"), "--backend.max_retries", "0"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "--backend.base_url" in err and "Traceback" not in err
    with FakeOpenAI(generic) as srv:
        with pytest.raises(SystemExit):
            main(args(run, srv.url, "--out_dir", str(tmp_path / "y"), "--backend.model", "gpt-nope"))
    assert "model 'gpt-nope' not found" in capsys.readouterr().err


def test_dry_run_prints_the_cost_and_asks_nothing(run, tmp_path, caplog):
    caplog.set_level("INFO", logger="lit_sae")
    with FakeOpenAI(generic) as srv:
        main(args(run, srv.url, "--out_dir", str(tmp_path / "d"), "--dry_run", "true", "--latents", "per_band",
                  "--n", "2"))
    assert srv.requests == []
    text = caplog.text
    assert "cost:" in text and "explainer" in text and "prompt tokens" in text and "per density decade" in text
    import re

    m = re.search(r"(\d+) explainer \+ (\d+) scorer prompts; about (\d+) prompt tokens", text)
    n_prompts, tokens = int(m.group(1)) + int(m.group(2)), int(m.group(3))
    assert n_prompts > 0 and tokens >= 100 * n_prompts  # every prompt holds instructions and examples


@pytest.mark.slow
def test_sigint_then_resume_asks_nothing_twice(run, tmp_path):
    out = tmp_path / "ai"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with FakeOpenAI(generic, delay_s=0.2) as srv:
        cmd = [sys.executable, "-m", "lit_sae", *args(run, srv.url, "--out_dir", str(out), "--n", "12")]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        deadline = time.time() + 300
        while len(srv.requests) < 6 and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
        assert p.returncode != 0 and not (out / "results.json").exists()
        first = len(srv.requests)
        cached = {json.dumps(json.loads(f.read_text())["request"]["messages"], sort_keys=True)
                  for f in (out / "cache").glob("*/*.json")}
        assert cached and len(cached) <= first
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        second = [json.dumps(m, sort_keys=True) for m in srv.requests[first:]]
        assert second and not set(second) & cached  # nothing stored was asked again
        assert len(second) == len(set(second))
        n = len(srv.requests)
        again = subprocess.run(cmd, env=env, capture_output=True, timeout=300, cwd=tmp_path)
        assert again.returncode == 0 and len(srv.requests) == n  # a rerun asks nothing
    files = list((out / "cache").glob("*/*.json"))
    assert all(f.stem == request_key(json.loads(f.read_text())["request"]) for f in files)
    assert not list((out / "cache").glob("*/.*.tmp"))
