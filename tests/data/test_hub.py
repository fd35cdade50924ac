"""Offline fast-fail for models, tokenizers and datasets (lit_sae.data.hub): one FileNotFoundError naming where it looked,
at once, with HF_HUB_OFFLINE set and a temporary Hugging Face cache (no network is tried)."""

from pathlib import Path

import pytest

from lit_sae.data.hub import check_dataset_available, check_model_available

REV = "0" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return hub


def _cached_repo(hub: Path, kind: str, repo_id: str, files: tuple[str, ...]) -> None:
    """huggingface_hub's cache layout: <kind>s--org--name/{refs/main, snapshots/<rev>/<files>}."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    (repo / "snapshots" / REV).mkdir(parents=True)
    for name in files:
        (repo / "snapshots" / REV / name).write_text("{}")


def test_cached_model_with_tokenizer_passes_offline(cache):
    _cached_repo(cache, "model", "org/lm", ("config.json", "tokenizer.json"))
    check_model_available("org/lm")


def test_cached_model_without_tokenizer_names_the_tokenizer(cache):
    _cached_repo(cache, "model", "org/lm", ("config.json",))
    with pytest.raises(FileNotFoundError) as info:
        check_model_available("org/lm")
    text = str(info.value)
    assert text.startswith("the tokenizer of model 'org/lm'") and str(cache) in text
    assert "huggingface-cli download org/lm" in text and "\n" not in text


def test_model_not_cached_names_the_cache(cache):
    with pytest.raises(FileNotFoundError, match=r"model 'org/none' is neither a local folder nor in the Hugging "
                                                r"Face cache \(" + str(cache).replace("/", r"\/")):
        check_model_available("org/none")


def test_cached_dataset_passes_offline_in_either_cache(cache, tmp_path):
    _cached_repo(cache, "dataset", "org/hub-copy", ("README.md",))
    check_dataset_available("org/hub-copy")
    (tmp_path / "hf" / "datasets" / "org___prepared").mkdir(parents=True)  # a dataset `datasets` prepared
    check_dataset_available("org/prepared")
    (tmp_path / "local").mkdir()
    check_dataset_available(str(tmp_path / "local"))


def test_dataset_not_cached_says_where_it_looked_and_how_to_get_it(cache, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        check_dataset_available("org/text")
    text = str(info.value)
    assert str(cache / "datasets--org--text") in text and str(tmp_path / "hf" / "datasets" / "org___text") in text
    assert "huggingface-cli download --repo-type dataset org/text" in text and "\n" not in text


def test_missing_local_dataset_folder_is_named(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*no-such"):
        check_dataset_available(str(tmp_path / "no-such"))


def test_hf_source_checks_before_needing_the_datasets_package(cache):
    from lit_sae.data.text import open_source

    with pytest.raises(FileNotFoundError, match="dataset 'org/text' is neither"):
        open_source("hf:org/text")
