"""load_sae against the documented layouts of SAELens, sparsify and OpenAI v5, without those libraries installed.

Each folder/file is written by hand as the library documents it; the reference reconstruction is the library's
formula evaluated densely in float64 (sae_lens/saes/*.py, sparsify/sparse_coder.py, sparse_autoencoder/model.py).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from lit_sae.artifacts.load import detect_format, load_sae

D, N, K = 12, 40, 5


def _x(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g) * 2 + torch.randn(D, generator=g) * 3).double()


def _w(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, N, generator=g) * 0.4, "b_enc": torch.randn(N, generator=g) * 0.3,
            "W_dec": torch.randn(N, D, generator=g) * 0.4, "b_dec": torch.randn(D, generator=g)}


def _ln(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + eps), mu, std


def saelens_reference(cfg, w, x):
    """SAELens's encode/decode (sae_lens/saes/{standard,topk,jumprelu}_sae.py), dense, float64."""
    w = {k: v.double() for k, v in w.items()}
    mu = std = None
    if cfg.get("normalize_activations") == "layer_norm":
        x, mu, std = _ln(x)
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg.get("architecture", "topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    W_dec = w["W_dec"]
    if arch == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * W_dec.norm(dim=-1)
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if cfg.get("rescale_acts_by_decoder_norm"):
            z = z / W_dec.norm(dim=-1)
    elif arch == "jumprelu":
        z = pre.relu() * (pre > w["threshold"])
    else:
        z = pre.relu()
    out = z @ W_dec + w["b_dec"]
    return out * std + mu if mu is not None else out


def write_saelens(path, cfg, w):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.float().contiguous() for k, v in w.items()}, str(path / "sae_weights.safetensors"))
    return path


SAELENS_CASES = {
    "topk_v6": {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "metadata": {
        "sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}},
    "topk_pre6_flat": {"d_in": D, "d_sae": N, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
                       "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"},
    "topk_rescaled": {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "rescale_acts_by_decoder_norm": True},
    "standard": {"architecture": "standard", "d_in": D, "d_sae": N},
    "standard_no_bdec_in": {"architecture": "standard", "d_in": D, "d_sae": N, "apply_b_dec_to_input": False},
    "standard_layer_norm": {"architecture": "standard", "d_in": D, "d_sae": N, "normalize_activations": "layer_norm"},
    "jumprelu": {"architecture": "jumprelu", "d_in": D, "d_sae": N},
    "topk_layer_norm": {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "normalize_activations": "layer_norm"},
}


@pytest.mark.parametrize("name", sorted(SAELENS_CASES))
def test_saelens_folders_reconstruct_as_saelens(tmp_path, name):
    cfg = SAELENS_CASES[name]
    w = _w()
    if cfg.get("architecture") == "jumprelu":
        w["threshold"] = torch.rand(N, generator=torch.Generator().manual_seed(3)) * 0.8
    folder = write_saelens(tmp_path / name, cfg, w)
    assert detect_format(folder) == "saelens"
    sae = load_sae(folder)
    x = _x()
    expected = saelens_reference(cfg, w, x)
    got = sae.reconstruct(x.float()).double()
    assert float((got - expected).abs().max() / x.abs().max()) < 1e-5
    assert sae.activation == {"standard": "relu"}.get(cfg.get("architecture"), cfg.get("architecture", "topk"))
    if "hook_name" in cfg or "metadata" in cfg:
        assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"


def test_saelens_batchtopk_training_save_uses_its_threshold_as_jumprelu(tmp_path):
    """SAELens saves BatchTopK for inference as JumpReLU with the scalar topk_threshold on every latent."""
    w = _w()
    w["topk_threshold"] = torch.tensor(0.7)
    folder = write_saelens(tmp_path / "bt", {"architecture": "batchtopk", "d_in": D, "d_sae": N, "k": K}, w)
    w_ref = {**w, "threshold": torch.full((N,), 0.7)}
    x = _x()
    expected = saelens_reference({"architecture": "jumprelu"}, w_ref, x)
    assert float((load_sae(folder).reconstruct(x.float()).double() - expected).abs().max() / x.abs().max()) < 1e-5


@pytest.mark.parametrize("field, value", [("architecture", "gated"), ("normalize_activations", "constant_norm_rescale"),
                                          ("hook_head_index", 3), ("activation_fn", "tanh-relu")])
def test_saelens_unsupported_field_is_named_with_the_file(tmp_path, field, value):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": N, field: value}
    folder = write_saelens(tmp_path / "bad", cfg, _w())
    with pytest.raises(ValueError, match=rf"cfg\.json: unsupported field {field}="):
        load_sae(folder)


def sparsify_reference(cfg, w, x):
    """sparsify's SparseCoder.encode/decode: relu(enc(x - b_dec)), top-k, W_dec rows + b_dec; float64."""
    w = {k: v.double() for k, v in w.items()}
    pre = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu()
    top = pre.topk(cfg["k"], dim=-1)
    return (top.values[..., None] * w["W_dec"][top.indices]).sum(-2) + w["b_dec"]


def _sparsify_files(folder, k=K):
    g = torch.Generator().manual_seed(4)
    w = {"encoder.weight": torch.randn(N, D, generator=g) * 0.4, "encoder.bias": torch.randn(N, generator=g) * 0.2,
         "W_dec": torch.randn(N, D, generator=g) * 0.4, "b_dec": torch.randn(D, generator=g)}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae.safetensors"))
    return cfg, w


def test_sparsify_folder_and_run_folder(tmp_path):
    cfg, w = _sparsify_files(tmp_path / "run" / "layers.6")
    x = _x()
    expected = sparsify_reference(cfg, w, x)
    for path in (tmp_path / "run" / "layers.6", tmp_path / "run"):
        assert detect_format(path) == "sparsify"
        sae = load_sae(path)
        assert float((sae.reconstruct(x.float()).double() - expected).abs().max()) < 1e-5 * float(x.abs().max())
        assert sae.metadata["hook_name"] == "blocks.6.hook_resid_post"
    _sparsify_files(tmp_path / "run" / "layers.7")
    with pytest.raises(ValueError, match="2 hookpoints.*layers.6, layers.7"):
        load_sae(tmp_path / "run")


def test_sparsify_transcoder_is_refused_by_field(tmp_path):
    _sparsify_files(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    (tmp_path / "t" / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(ValueError, match=r"t/cfg\.json: unsupported field transcode"):
        load_sae(tmp_path / "t")


def openai_reference(sd, x):
    """sparse_autoencoder/model.py Autoencoder with TopK: LN(x), topk(enc(x - pre_bias) + latent_bias), relu."""
    xn, mu, std = _ln(x)
    pre = (xn - sd["pre_bias"].double()) @ sd["encoder.weight"].double().T + sd["latent_bias"].double()
    top = pre.topk(sd["activation_state_dict"]["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (z @ sd["decoder.weight"].double().T + sd["pre_bias"].double()) * std + mu


def test_openai_v5_state_dict(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {"pre_bias": torch.randn(D, generator=g) * 0.1, "latent_bias": torch.randn(N, generator=g) * 0.1,
          "encoder.weight": torch.randn(N, D, generator=g) * 0.4,
          "decoder.weight": torch.randn(D, N, generator=g) * 0.4,
          "stats_last_nonzero": torch.zeros(N, dtype=torch.long), "activation": "TopK",
          "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    torch.save(sd, tmp_path / "layer_8.pt")
    assert detect_format(tmp_path / "layer_8.pt") == "openai"
    sae = load_sae(tmp_path / "layer_8.pt")
    x = _x()
    assert (sae.normalize, sae.k) == ("layernorm", K)
    assert float((sae.reconstruct(x.float()).double() - openai_reference(sd, x)).abs().max() / x.abs().max()) < 1e-5
    torch.save({**sd, "activation": "GELU"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: unsupported field activation='GELU'"):
        load_sae(tmp_path / "bad.pt")


def test_nothing_recognisable_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no SAE found"):
        load_sae(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable torch file"):
        load_sae(tmp_path / "junk.pt")
