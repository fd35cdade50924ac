"""`lit-sae features` end to end on a tiny GPT-2: the browser's files, a real headless chromium, bad inputs.

Screenshots are kept under ``$LIT_SAE_ARTIFACTS`` when set (e.g. ``LIT_SAE_ARTIFACTS=artifacts make test``),
else under pytest's tmp folder (printed by ``pytest -s``; pytest keeps the last 3 runs' tmp folders).
"""

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest

from lit_sae.cli.main import main
from lit_sae.features.run import features
from tests.support.tiny_lm import harvest_tiny

N_LATENTS = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder like runs/demo: shards/, checkpoints/last.ckpt (5 training steps)."""
    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.module import SAEModule

    root = harvest_tiny(tmp_path_factory.mktemp("run"))
    dm = ActivationDataModule(str(root / "shards"), batch_size_tokens=128, shuffle_buffer_tokens=256, num_workers=0)
    module = SAEModule(d_in=32, n_latents=N_LATENTS, k=4, init_tokens=256, export_dir=str(root / "sae"),
                       hook_point="blocks.0.hook_resid_post", lm_name=str(root / "lm"))
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                        default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def browser(run):
    page = features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), split="test", progress=False)
    return page


def test_files_and_data(run, browser):
    assert browser == run / "features" / "index.html"
    folder = browser.parent
    summary = json.loads((folder / "data" / "summary.json").read_text())
    assert summary["format"] == "lit-sae-features/1" and len(summary["latents"]["id"]) == N_LATENTS
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert summary["n_tokens"] == manifest["splits"]["test"]["tokens"]  # the whole test split, as harvested
    records = json.loads(gzip.open(folder / "data" / "latents" / "00000.json.gz").read())
    assert [r["id"] for r in records] == list(range(N_LATENTS))
    contexts = json.loads(gzip.open(folder / "data" / "contexts.json.gz").read())
    live = [r for r in records if r["count"] > 0]
    assert live and summary["n_dead"] == N_LATENTS - len(live)
    for r in live:
        assert sum(r["hist"]["counts"]) == r["count"] == sum(b["count"] for b in r["bands"])
        assert r["top"][0]["value"] == r["max"]
        t = r["top"][0]
        assert [t["pos"] - t["start"], 1000] in t["acts"]  # the max itself: 1000 permille of the latent's max
        assert 0 <= t["ctx"] < len(contexts)
        assert len(r["logits"]["top"]) == 10 and len(r["neighbours"]) == 5
        assert r["explanation"]["status"] in ("ok", "no held-out firing")
        assert r["explanation"]["n_fires"] >= 0 and r["explanation"]["n_matched"] >= 0  # every score's sample size
    assert summary["logits"]["formula"].startswith("z = W_U (g * (W_dec[i] - mean_j") and len(summary["logits"]["mean_top"]) == 10
    for path in folder.rglob("*"):
        if path.is_file():
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            assert not re.search(rb"https?://", raw), path
    assert not [p for p in run.iterdir() if p.name.startswith(".features")]  # no temp folder left


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root: apt-get install -y chromium)")
    return exe


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LIT_SAE_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _chrome(exe, url, *extra, timeout=120):
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--virtual-time-budget=10000", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_page_in_headless_chromium(browser, tmp_path):
    exe = _chromium()
    url = browser.as_uri()
    netlog = tmp_path / "netlog.json"
    dom = _chrome(exe, url, "--dump-dom", f"--log-net-log={netlog}").stdout
    assert 'data-ready="1"' in dom, dom[-2000:]
    rows = re.findall(r'<tr class="[^"]*" data-id="(\d+)"', dom)
    assert sorted(map(int, rows)) == list(range(N_LATENTS))
    # the page made no network request: every http(s) request in the net log is the browser's own background
    # traffic (initiator "not an origin"), none comes from the page (its initiator would be its origin, "null")
    events = json.loads(netlog.read_text())["events"]
    from_page = [e["params"]["url"] for e in events if re.match(r"https?://", e.get("params", {}).get("url", ""))
                 and e["params"].get("initiator", "not an origin") != "not an origin"]
    assert from_page == []
    # open the latent with the most activations: its top context is shown with highlighted tokens
    summary = json.loads((browser.parent / "data" / "summary.json").read_text())
    best = max(range(N_LATENTS), key=lambda i: summary["latents"]["count"][i])
    dom = _chrome(exe, f"{url}#latent-{best}", "--dump-dom").stdout
    assert f"Latent {best}</h2>" in dom
    top = dom.split('id="top"', 1)[1]
    assert re.search(r'class="t hl[^"]*" title="[^"]*" style="background: rgba\(255', top)
    shot = _artifacts(tmp_path) / "feature-browser.png"
    _chrome(exe, f"{url}#latent-{best}", f"--screenshot={shot}", "--window-size=1500,1000")
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_cli_features_and_errors(run, tmp_path, capsys, caplog):
    ckpt = run / "checkpoints" / "last.ckpt"
    caplog.set_level("INFO", logger="lit_sae")
    main(["features", "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "b"), "--n2g", "false",
          "--progress", "false", "--n_contexts", "4"])
    said = capsys.readouterr()
    assert str(tmp_path / "b" / "index.html") in said.out + said.err + caplog.text  # it says where the browser is
    assert json.loads((tmp_path / "b" / "data" / "summary.json").read_text())["source"]["split"] == "train"  # default
    assert "estimated memory for 48 latents" in caplog.text  # said before starting
    # without the in-memory code cache (the LM re-encodes the text in each pass) the data are the same
    main(["features", "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "c"), "--n2g", "false",
          "--progress", "false", "--n_contexts", "4", "--cache_mb", "0", "--batch_size", "3"])
    chunk = Path("data") / "latents" / "00000.json.gz"
    assert gzip.open(tmp_path / "b" / chunk).read() == gzip.open(tmp_path / "c" / chunk).read()
    with pytest.raises(SystemExit) as e:
        main(["features", "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert e.value.code == 2 and "nope.ckpt" in capsys.readouterr().err


def test_bad_inputs_name_the_file(run, tmp_path):
    from lit_sae.artifacts.export import export_sae
    from lit_sae.sae.model import TopKSAE

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        features(ckpt_path=str(bad), progress=False)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        features(ckpt_path=str(tmp_path / "missing.ckpt"), progress=False)
    broken = tmp_path / "shards"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"shards/manifest.json.*not valid JSON"):
        features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), manifest=str(broken), progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), manifest=str(tmp_path / "nowhere"), progress=False)
    wide = TopKSAE(48, 64, 4)
    wide.data_initialized.fill_(True)
    export_sae(wide, tmp_path / "wide", hook_point="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"wide: the SAE's d_in=48 differs from d_in=32 .*manifest.json"):
        features(ckpt_path=str(tmp_path / "wide"), manifest=str(run / "shards"), progress=False)
    assert not (tmp_path / "features").exists()


def test_untrained_checkpoint_is_refused(run, tmp_path):
    from lit_sae.train.module import SAEModule

    module = SAEModule(d_in=32, n_latents=16, k=4, hook_point="blocks.0.hook_resid_post")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "run" / "checkpoints" / "untrained.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="untrained.ckpt.*no training tokens.*allow_untrained"):
        features(ckpt_path=str(path), manifest=str(run / "shards"), progress=False)
    page = features(ckpt_path=str(path), manifest=str(run / "shards"), allow_untrained=True, progress=False, n2g=False,
                    n_contexts=2)
    assert page == tmp_path / "run" / "features" / "index.html"


def test_interrupted_write_leaves_nothing_complete(run, tmp_path, monkeypatch):
    import lit_sae.features.write as write

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(write.resources, "files", boom)  # fails after the data files were written
    with pytest.raises(OSError, match="disk full"):
        features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), out_dir=str(tmp_path / "f"), progress=False, n2g=False,
                 n_contexts=2)
    assert not (tmp_path / "f").exists() and list(tmp_path.iterdir()) == []


def test_test_report_has_explainability(run, tmp_path):
    """`lit-sae test` with callbacks/eval.yaml's EvalReport: N2G summary in report.json / report.md and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_sae.callbacks.eval_report import EvalReport
    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.module import SAEModule

    module = SAEModule.load_from_checkpoint(str(run / "checkpoints" / "last.ckpt"), map_location="cpu")
    dm = ActivationDataModule(str(run / "shards"), batch_size_tokens=128, shuffle_buffer_tokens=256, num_workers=0)
    cb = EvalReport(out_dir=str(tmp_path / "report"), downstream=False, probes=False, n_ablation_latents=2,
                    ablation_contexts_per_latent=1, progress=False)
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path / "logs"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(module, datamodule=dm)
    ex = json.loads((tmp_path / "report" / "report.json").read_text())["explainability"]
    assert ex["n_latents"] == N_LATENTS and ex["n_scored"] + ex["n_never_fired"] + ex["n_no_heldout_firing"] == N_LATENTS
    assert 0 <= ex["mean_precision"] <= 1 and 0 <= ex["median_recall"] <= 1
    test_contexts = json.loads((run / "shards" / "manifest.json").read_text())["splits"]["test"]["contexts"]
    assert ex["fit_contexts"] + ex["score_contexts"] == min(256, test_contexts)  # even rows fit, odd rows score
    assert ex["fit_contexts"] - ex["score_contexts"] in (0, 1)
    assert "## Explainability" in (tmp_path / "report" / "report.md").read_text()
    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent),
                           size_guidance={"tensors": 0})
    acc.Reload()
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("eval/")]  # one text card, not a card per number
    table = acc.Tensors("eval/numbers/text_summary")[0].tensor_proto.string_val[0].decode()
    row = next(line for line in table.splitlines() if line.startswith("| eval/explainability/mean_precision |"))
    assert float(row.split("|")[2]) == pytest.approx(ex["mean_precision"], rel=1e-5)
    assert "| eval/explainability/frac_precision_recall_ge_0.8 |" in table


def test_train_split_token_budget(run, browser, tmp_path):
    page = features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), out_dir=str(tmp_path / "t"), split="train",
                    train_tokens=300, n2g=False, progress=False)
    summary = json.loads((page.parent / "data" / "summary.json").read_text())
    assert summary["source"]["split"] == "train" and 300 <= summary["n_tokens"] < 300 + 32
    train = json.loads(gzip.open(page.parent / "data" / "contexts.json.gz").read())
    test = json.loads(gzip.open(browser.parent / "data" / "contexts.json.gz").read())
    assert not {tuple(c) for c in train} & {tuple(c) for c in test}  # train and test contexts never mix


def test_export_folder_finds_the_run_shards(run, tmp_path):
    """An exported SAE inside a run folder (runs/x/sae) is browsed with the run's shards, output beside it."""
    shutil.copytree(run / "sae", tmp_path / "sae")
    (tmp_path / "shards").symlink_to(run / "shards")
    page = features(ckpt_path=str(tmp_path / "sae"), n2g=False, n_contexts=3, progress=False)
    assert page == tmp_path / "features" / "index.html"
    summary = json.loads((page.parent / "data" / "summary.json").read_text())
    assert summary["sae"]["tokens_seen"] is None and summary["source"]["manifest"].endswith("manifest.json")


def test_browser_never_replaces_an_unrelated_folder(tmp_path):
    """An --out_dir that holds anything but an earlier browser is refused and left as it was."""
    from lit_sae.features.write import _is_browser

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    assert not _is_browser(mine)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _is_browser(empty)
    browser = tmp_path / "features"
    (browser / "data").mkdir(parents=True)
    (browser / "js").mkdir()
    (browser / "index.html").write_text("<html></html>")
    (browser / "data" / "summary.json").write_text("{}")
    assert _is_browser(browser)
    (browser / "extra.txt").write_text("a user's file")
    assert not _is_browser(browser)


def test_features_refuses_an_unrelated_out_dir(run, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes: exists and is not a feature browser"):
        features(ckpt_path=str(run / "checkpoints" / "last.ckpt"), out_dir=str(mine), progress=False, n2g=False,
                 n_contexts=2)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "keep me"


def test_browser_shows_autointerp_beside_n2g(run, tmp_path):
    """`lit-sae explain` (fake OpenAI-compatible server) then `lit-sae features`: the latent page shows the LLM
    explanation, its scores with sample sizes and the scored samples marked right/wrong; the index has its columns
    and says which text each number comes from."""
    pytest.importorskip("openai")
    from lit_sae.autointerp.backend import BackendSpec
    from lit_sae.autointerp.run import explain
    from tests.autointerp.test_oracle import oracle
    from tests.support.fake_openai import FakeOpenAI

    ckpt = str(run / "checkpoints" / "last.ckpt")
    with FakeOpenAI(oracle()) as srv:
        res = explain(ckpt_path=ckpt, split="test", n=4, progress=False,
                      backend=BackendSpec(kind="openai", model="fake-model", base_url=srv.url, concurrency=2))
    assert res == run / "autointerp" / "results.json"
    data = json.loads(res.read_text())
    scored = [r for r in data["latents"] if r["status"] == "ok"]
    assert scored
    page = features(ckpt_path=ckpt, out_dir=str(tmp_path / "b"), split="test", n2g=True, progress=False)
    assert json.loads((page.parent / "data" / "autointerp.json").read_text())["latents"].keys() == \
        {str(r["latent"]) for r in data["latents"]}
    exe = _chromium()
    r = scored[0]
    dom = _chrome(exe, f"{page.as_uri()}#latent-{r['latent']}", "--dump-dom").stdout
    assert 'data-ready="1"' in dom, dom[-2000:]
    assert r["explanation"] in dom.replace("&quot;", '"')
    assert "detection accuracy " in dom and "fuzzing accuracy " in dom
    assert f"(n={r['detection']['n']}: {r['detection']['n_pos']} activating" in dom
    assert re.search(r'class="v (ok|bad)"[^>]*>[\u2713\u2717] (yes|no)<', dom)
    assert "LLM explanations (autointerp)" in dom and "lit-sae explain: test split" in dom
    assert "this browser's text: test split" in dom and "(of " in dom  # N2G scores carry their sample sizes
    assert "relative to the mean over latents" in dom
