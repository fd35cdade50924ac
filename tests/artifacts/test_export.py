"""Exports: complete SAELens / sparsify / OpenAI layouts, provenance, unit-norm promise (EMA on), safe writing."""

import hashlib
import json
import os
import stat

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lit_sae.artifacts.export import export, export_sae, provenance
from lit_sae.artifacts.load import load_sae, read_checkpoint
from lit_sae.cli.main import main
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.sae.model import TopKSAE
from lit_sae.train.module import SAEModule
from tests.artifacts.test_formats import openai_reference, saelens_reference, sparsify_reference

HOOK = "blocks.2.hook_resid_post"


def _sae(normalize="scalar", activation="topk", d=16, n=64, k=4, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k, normalize=normalize, activation=activation)
    sae.init_from_data_(torch.randn(512, d) * 5 + 2)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.threshold.fill_(0.3)
    return sae.eval()


def _x(d=16, n=200):
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(7)) * 5 + 2).double()


def _rel(a, b, x):
    return float((a.double() - b.double()).abs().max() / x.abs().max())


@pytest.mark.parametrize("normalize, activation", [("scalar", "topk"), ("layernorm", "topk"), ("none", "batchtopk")])
def test_saelens_export_is_complete_and_reconstructs_by_saelens_formula(tmp_path, normalize, activation):
    sae = _sae(normalize, activation)
    prov = {"context_length": 64, "prepend_bos": False, "dataset_path": "stdlib", "model_name_resolvable": "/m/x",
            "checkpoint": {"sha256": "ab" * 32, "step": 7, "tokens_seen": 700}}
    export_sae(sae, tmp_path / "e", hook_point=HOOK, lm_name="smollm2-135m", provenance=prov)
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_name"], cfg["hook_layer"]) == (16, 64, HOOK, 2)
    assert cfg["dtype"] == "float32"
    assert (cfg["context_size"], cfg["prepend_bos"], cfg["dataset_path"], cfg["model_name"]) == (64, False, "stdlib",
                                                                                                 "/m/x")
    assert cfg["metadata"]["context_size"] == 64 and cfg["lit_sae"]["model_alias"] == "smollm2-135m"
    assert cfg["lit_sae"]["checkpoint"]["step"] == 7
    assert cfg["normalize_activations"] == ("layer_norm" if normalize == "layernorm" else "none")
    assert cfg["architecture"] == ("topk" if activation == "topk" else "jumprelu")
    assert float((w["W_dec"].double().norm(dim=1) - 1).abs().max()) < 1e-6  # SAEBench's decoder-norm check
    x = _x()
    assert _rel(saelens_reference(cfg, w, x), sae.reconstruct(x.float()), x) < 1e-5


def test_sparsify_and_openai_exports_reconstruct_by_their_formulas(tmp_path):
    sae = _sae("scalar")
    export_sae(sae, tmp_path / "s", hook_point=HOOK, format="sparsify")
    cfg = json.loads((tmp_path / "s" / "layers.2" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "s" / "layers.2" / "sae.safetensors"))
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (16, 64, 4, "topk")
    assert not cfg["transcode"] and not cfg["skip_connection"]
    x = _x()
    assert _rel(sparsify_reference(cfg, w, x), sae.reconstruct(x.float()), x) < 1e-5
    ln = _sae("layernorm")
    export_sae(ln, tmp_path / "o", hook_point=HOOK, format="openai")
    sd = torch.load(tmp_path / "o" / "sae.pt", weights_only=True)
    assert _rel(openai_reference(sd, x), ln.reconstruct(x.float()), x) < 1e-5
    assert _rel(load_sae(tmp_path / "o").reconstruct(x.float()), ln.reconstruct(x.float()), x) < 1e-5
    with pytest.raises(ValueError, match="sparsify's SparseCoder has no input normalisation"):
        export_sae(ln, tmp_path / "s2", hook_point=HOOK, format="sparsify")
    with pytest.raises(ValueError, match="only activation='topk', normalize='layernorm'"):
        export_sae(sae, tmp_path / "o2", hook_point=HOOK, format="openai")


def test_unit_norm_deviation_is_folded_and_recorded(tmp_path):
    sae = _sae("none")
    with torch.no_grad():
        sae.W_dec.mul_(1.001)
    export_sae(sae, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    dev = cfg["lit_sae"]["decoder_renormalized"]
    assert dev["max_abs_norm_deviation"] == pytest.approx(0.001, rel=1e-3) and "EMA" in dev["reason"]
    w = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    assert float((w["W_dec"].norm(dim=1) - 1).abs().max()) < 1e-6


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    dm = SyntheticDataModule(d_in=16, n_features=64, active=3, batch_size_tokens=256, train_tokens=6 * 256)
    module = SAEModule(d_in=16, n_latents=32, k=4, ema_decay=0.9, export_dir=str(tmp / "fit_export"),
                       hook_point=HOOK, normalize="scalar")
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp / "m.ckpt")
    return tmp / "m.ckpt", module


def test_export_of_an_ema_checkpoint_keeps_every_promise(tmp_path, ema_checkpoint):
    ckpt, module = ema_checkpoint
    out = export(str(ckpt), str(tmp_path / "e"))
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(str(out / "sae_weights.safetensors"))
    # Unit-norm rows with the EMA on: the averaged rows are folded back to the sphere (as in evaluation)
    assert float((w["W_dec"].double().norm(dim=1) - 1).abs().max()) < 1e-6
    assert "decoder_renormalized" not in cfg["lit_sae"]
    at_fit_end = load_file(str(ckpt.parent / "fit_export" / "sae_weights.safetensors"))  # on_fit_end's export
    assert float((at_fit_end["W_dec"].double().norm(dim=1) - 1).abs().max()) < 1e-6
    torch.testing.assert_close(at_fit_end["W_dec"], w["W_dec"])
    prov = cfg["lit_sae"]["checkpoint"]
    assert prov["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (prov["step"], prov["tokens_seen"], prov["ema_steps"]) == (6, 6 * 256, 6)
    # The export reconstructs exactly what the module evaluates (EMA weights swapped in)
    x = _x()
    with module.ema.swapped_into(module.sae):
        want = module.sae.eval().reconstruct(x.float())
    assert _rel(saelens_reference(cfg, w, x), want, x) < 1e-5
    assert _rel(read_checkpoint(ckpt)[0].reconstruct(x.float()), want, x) < 1e-5
    assert _rel(load_sae(ckpt).reconstruct(x.float()), load_sae(out).reconstruct(x.float()), x) < 1e-5


def test_cli_export_needs_overwrite_and_never_mixes_with_other_files(tmp_path, ema_checkpoint, capsys):
    ckpt, _ = ema_checkpoint
    out = tmp_path / "e"
    main(["export", str(ckpt), "--out", str(out)])
    first = (out / "sae_weights.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exn:
        main(["export", str(ckpt), "--out", str(out)])
    assert exn.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    main(["export", str(ckpt), "--out", str(out), "--overwrite"])
    assert (out / "sae_weights.safetensors").read_bytes() == first and sorted(os.listdir(tmp_path)) == ["e"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--out", str(tmp_path / "mine"), "--overwrite", "true"])
    assert "not part of a lit-sae export (notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]
    main(["export", str(ckpt), "--out", str(tmp_path / "sp"), "--format", "sparsify"])
    assert sorted(os.listdir(tmp_path / "sp" / "layers.2")) == ["cfg.json", "sae.safetensors"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_exports_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        export_sae(_sae(), tmp_path / "e")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == dir_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").iterdir()} == {file_mode}


def test_provenance_reads_the_manifest(tmp_path, monkeypatch):
    manifest = {"context_length": 64, "hook_point": HOOK, "model": {"name_or_path": "gpt2"},
                "config": {"source": "stdlib"}, "exclusions": {"drop_first_position": True}}
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "m.ckpt").write_bytes(b"x")
    info = {"global_step": 3, "tokens_seen": 30, "ema_steps": 0, "datamodule": {"path": str(tmp_path / "shards")}}
    p = provenance(tmp_path / "m.ckpt", info)
    assert p["manifest"]["sha256"] == hashlib.sha256((tmp_path / "shards" / "manifest.json").read_bytes()).hexdigest()
    assert (p["context_length"], p["prepend_bos"], p["drop_first_position"], p["dataset_path"]) == (64, False, True,
                                                                                                   "stdlib")
    assert p["checkpoint"] == {"path": str((tmp_path / "m.ckpt").resolve()), "sha256": hashlib.sha256(b"x").hexdigest(),
                               "step": 3, "tokens_seen": 30, "ema_steps": 0}
    # A recipe's relative data path is found from the folders above the checkpoint, wherever export runs
    (tmp_path / "run" / "ckpts").mkdir(parents=True)
    (tmp_path / "run" / "ckpts" / "last.ckpt").write_bytes(b"y")
    (tmp_path / "shards").rename(tmp_path / "run" / "shards")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    p = provenance(tmp_path / "run" / "ckpts" / "last.ckpt", {**info, "datamodule": {"path": "shards"}})
    assert p["manifest"]["path"] == str((tmp_path / "run" / "shards" / "manifest.json").resolve())


def test_init_from_any_format_checks_hook_point_and_width(tmp_path):
    w = {"W_enc": torch.randn(16, 48) * 0.3, "b_enc": torch.zeros(48), "W_dec": torch.randn(48, 16) * 0.3,
         "b_dec": torch.zeros(16), "threshold": torch.full((48,), 0.1)}
    from tests.artifacts.test_formats import write_saelens

    folder = write_saelens(tmp_path / "j", {"architecture": "jumprelu", "d_in": 16, "d_sae": 48,
                                            "hook_name": HOOK}, w)
    module = SAEModule(d_in=16, n_latents=48, hook_point=HOOK, init_from=str(folder)).eval()
    x = _x().float()
    expected = saelens_reference({"architecture": "jumprelu"}, w, x.double())
    assert _rel(module(x).x_hat.detach(), expected, x) < 1e-5
    with pytest.raises(ValueError, match="hook point 'blocks.2.hook_resid_post'.*'blocks.5.hook_resid_post'"):
        SAEModule(d_in=16, n_latents=48, hook_point="blocks.5.hook_resid_post", init_from=str(folder))
    with pytest.raises(ValueError, match=r"'d_in': \(24, 16\).*d_in comes from the data"):
        SAEModule(d_in=24, n_latents=48, hook_point=HOOK, init_from=str(folder))
