"""Nothing lit-sae reads runs code (``lit_sae.safe_io``): a pickle payload in a checkpoint, an OpenAI ``.pt``, a
sharded checkpoint's ``meta.pt`` or its DCP ``.metadata`` is refused with one line naming the file and the object,
and the payload never runs; genuine files still load. JSON lit-sae writes is strict."""

import json
import os
import warnings

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp

from lit_sae.artifacts.load import load_sae, read_checkpoint
from lit_sae.cli.main import main
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.safe_io import SafeFileSystemReader, UnsafeFileError, dumps_json, torch_load
from lit_sae.train.module import SAEModule

MARKER = "lit_sae_payload_ran"


class Payload:
    """Runs ``touch MARKER`` in the current folder when unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genuine")
    dm = SyntheticDataModule(d_in=8, n_features=16, active=2, batch_size_tokens=64, train_tokens=2 * 64)
    module = SAEModule(d_in=8, n_latents=16, k=2, export_dir="none")
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp / "last.ckpt")
    return tmp / "last.ckpt"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _evil_copy(genuine, where):
    ckpt = torch.load(genuine, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["note"] = Payload()
    torch.save(ckpt, where)
    return where


def test_genuine_checkpoint_loads_without_unpickling_code(genuine):
    sae, info = read_checkpoint(genuine)
    assert (sae.d_in, sae.n_latents, info["global_step"]) == (8, 16, 2)


def test_payload_checkpoint_is_refused_naming_file_and_object(genuine, in_tmp):
    evil = _evil_copy(genuine, in_tmp / "shared_run.ckpt")
    for read in (torch_load, load_sae, read_checkpoint):
        with pytest.raises(UnsafeFileError) as err:
            read(evil)
        line = str(err.value)
        assert "\n" not in line and str(evil) in line and "system" in line and "never executes code" in line
    assert not (in_tmp / MARKER).exists()


def test_openai_pt_with_payload_is_refused(in_tmp):
    pt = in_tmp / "sae.pt"
    torch.save({"pre_bias": torch.zeros(4), "latent_bias": torch.zeros(8), "encoder.weight": torch.zeros(8, 4),
                "decoder.weight": torch.zeros(4, 8), "activation": Payload()}, pt)
    with pytest.raises(UnsafeFileError, match="sae.pt"):
        load_sae(in_tmp)  # the folder form: <folder>/sae.pt
    assert not (in_tmp / MARKER).exists()


def test_cli_export_of_payload_checkpoint_exits_2_with_one_line(genuine, in_tmp, capsys):
    evil = _evil_copy(genuine, in_tmp / "shared_run.ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["export", str(evil), "--out", str(in_tmp / "e")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: UnsafeFileError: ") and str(evil) in err[0]
    assert not (in_tmp / MARKER).exists() and not (in_tmp / "e").exists()


def test_resume_through_checkpoint_io_refuses_payload(genuine, in_tmp):
    from lit_sae.train.atomic_io import AtomicCheckpointIO

    evil = _evil_copy(genuine, in_tmp / "last.ckpt")
    with pytest.raises(UnsafeFileError):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not (in_tmp / MARKER).exists()
    assert AtomicCheckpointIO().load_checkpoint(genuine)["global_step"] == 2


def _sharded_folder(genuine, folder):
    """A sharded checkpoint folder as ``SAEModelParallelStrategy`` writes it: DCP tensors, meta.pt, mesh.json."""
    ckpt = torch.load(genuine, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=str(folder), no_dist=True)
    ckpt.pop("optimizer_states", None)
    torch.save(ckpt, folder / "meta.pt")
    (folder / "mesh.json").write_text('{"data_parallel_size": 1, "tensor_parallel_size": 1}')
    return ckpt


def test_sharded_folder_meta_and_dcp_metadata_payloads_are_refused(genuine, in_tmp):
    folder = in_tmp / "sharded.ckpt"
    folder.mkdir()
    ckpt = _sharded_folder(genuine, folder)
    sae, _ = read_checkpoint(folder)  # genuine: loads
    assert sae.n_latents == 16
    ckpt["hyper_parameters"]["note"] = Payload()
    torch.save(ckpt, folder / "meta.pt")
    with pytest.raises(UnsafeFileError, match="meta.pt"):
        read_checkpoint(folder)
    ckpt["hyper_parameters"].pop("note")
    torch.save(ckpt, folder / "meta.pt")
    import pickle

    meta = SafeFileSystemReader(folder).read_metadata()
    meta.storage_meta = Payload()  # DCP pickles its Metadata; a crafted one carries a payload
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeFileError, match=r"\.metadata.*posix\.system|\.metadata.*system"):
        read_checkpoint(folder)
    assert not (in_tmp / MARKER).exists()


def test_dumps_json_is_strict():
    assert json.loads(dumps_json({"a": [1.0, 2]})) == {"a": [1.0, 2]}
    with pytest.raises(ValueError, match=r"manifest.json.*exclusions.norm_median"):
        dumps_json({"exclusions": {"norm_median": float("nan")}}, where="manifest.json")
    assert dumps_json({"x": [float("inf"), 1.0]}, nonfinite="null") == '{"x": [null, 1.0]}'


def test_fit_init_from_a_payload_checkpoint_exits_2(genuine, in_tmp):
    from tests.cli.test_cli_runs import recipe
    from tests.support.faults import cli, error_line

    evil = _evil_copy(genuine, in_tmp / "shared_run.ckpt")
    code, err = cli(["fit", "--config", str(recipe(in_tmp)), "--model.init_from", str(evil)])
    assert code == 2 and "UnsafeFileError" in error_line(err) and str(evil) in error_line(err)
    assert not (in_tmp / MARKER).exists() and not list(in_tmp.rglob("*.ckpt"))[1:]  # only the crafted file


def test_test_ckpt_path_of_a_payload_checkpoint_exits_2(genuine, in_tmp):
    from tests.cli.test_cli_runs import recipe
    from tests.support.faults import cli, error_line

    evil = _evil_copy(genuine, in_tmp / "shared_run.ckpt")
    code, err = cli(["test", "--config", str(recipe(in_tmp)), "--ckpt_path", str(evil)])
    assert code == 2 and "UnsafeFileError" in error_line(err) and str(evil) in error_line(err), err
    assert not (in_tmp / MARKER).exists()
