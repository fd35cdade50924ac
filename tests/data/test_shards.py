"""Shard format helpers: ShardWriter round trip, crash safety, manifest and block validation."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from lit_sae.data.shards import (
    FORMAT,
    Manifest,
    ShardError,
    ShardNotFoundError,
    ShardWriter,
    decode_block,
    read_manifest,
    write_manifest_atomic,
)


def _manifest(d_in, dtype, block_tokens, shards, split="train"):
    return {"format": FORMAT, "d_in": d_in, "dtype": dtype, "block_tokens": block_tokens,
            "splits": {split: {"shards": shards, "tokens": sum(s["tokens"] for s in shards)}}}


def _read_all(folder, infos, manifest):
    out = []
    for s in wds.WebDataset([os.path.join(folder, i["name"]) for i in infos], shardshuffle=False):
        out.append(decode_block(s, manifest, s["__url__"]))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_bit_exact(tmp_path, dtype):
    reported = []
    w = ShardWriter(tmp_path, "train", 8, dtype, block_tokens=4, tokens_per_shard=12, on_shard=reported.append)
    x = torch.randn(30, 8) * 100
    ids = torch.arange(30)
    w.add(x[:7], ids[:7], ids[:7] + 1000, ids[:7] % 5)
    w.add(x[7:].numpy(), ids[7:].numpy(), ids[7:] + 1000, ids[7:] % 5)
    infos = w.close()
    assert infos == reported
    assert [i["tokens"] for i in infos] == [12, 12, 6]
    assert [i["blocks"] for i in infos] == [3, 3, 2]
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for i in infos:  # the reported hash is the file's hash
        assert hashlib.sha256((tmp_path / i["name"]).read_bytes()).hexdigest() == i["sha256"]
    blocks = _read_all(tmp_path, infos, _manifest(8, dtype, 4, infos))
    assert [b["key"] for b in blocks][:4] == ["train-000000-00000", "train-000000-00001", "train-000000-00002",
                                             "train-000001-00000"]
    acts = torch.cat([b["acts"] for b in blocks])
    assert acts.dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)
    assert torch.equal(acts, x.to(acts.dtype))
    assert torch.equal(torch.cat([b["tok"] for b in blocks]), ids.int())
    assert torch.equal(torch.cat([b["ctx"] for b in blocks]), ids + 1000)
    assert torch.cat([b["ctx"] for b in blocks]).dtype == torch.int64


def test_storage_dtype_input_is_kept_bitwise(tmp_path):
    x = torch.randn(4, 3).to(torch.bfloat16)
    with ShardWriter(tmp_path, "val", 3, "bfloat16", 4, 4) as w:
        w.add(x, np.zeros(4, np.int64), np.zeros(4, np.int64), np.zeros(4, np.int64))
    (b,) = _read_all(tmp_path, w.written, _manifest(3, "bfloat16", 4, w.written, "val"))
    assert torch.equal(b["acts"].view(torch.int16), x.view(torch.int16))


def test_deterministic_bytes_and_start_index(tmp_path):
    x = torch.randn(8, 4)
    hashes = []
    for sub in ("a", "b"):
        w = ShardWriter(tmp_path / sub, "train", 4, "float16", 4, 8, start_index=3)
        w.add(x, torch.arange(8), torch.arange(8), torch.arange(8))
        hashes.append(w.close()[0]["sha256"])
        assert os.listdir(tmp_path / sub) == ["train-000003.tar"]
    assert hashes[0] == hashes[1]


def test_abort_on_exception_writes_nothing_partial(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", 4, "float16", 4, 8) as w:
            w.add(torch.randn(12, 4), torch.arange(12), torch.arange(12), torch.arange(12))
            raise RuntimeError("harvest crashed")
    assert os.listdir(tmp_path) == ["train-000000.tar"]  # the complete shard only; the 4 buffered rows are gone
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_writer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of block_tokens"):
        ShardWriter(tmp_path, "train", 4, "float16", 4, 10)
    with pytest.raises(ValueError, match="dtype"):
        ShardWriter(tmp_path, "train", 4, "float32", 4, 8)
    w = ShardWriter(tmp_path, "train", 4, "float16", 4, 8)
    with pytest.raises(ValueError, match=r"shape \(T, 4\)"):
        w.add(torch.randn(3, 5), torch.arange(3), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="tok"):
        w.add(torch.randn(3, 4), torch.arange(2), torch.arange(3), torch.arange(3))


def test_manifest_atomic_and_errors(tmp_path):
    m = _manifest(4, "float16", 4, [])
    path = write_manifest_atomic(str(tmp_path), m)
    assert os.listdir(tmp_path) == ["manifest.json"]
    want = Manifest.from_json(m)
    assert read_manifest(str(tmp_path)) == want and want.d_in == 4 and want.splits["train"].shards == []
    assert read_manifest(path) == want
    assert read_manifest(str(tmp_path / "train-{000000..000003}.tar")) == want
    with pytest.raises(ShardNotFoundError, match="does not exist"):
        read_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardNotFoundError, match=r"empty.*manifest not found.*folder is empty"):
        read_manifest(str(tmp_path / "empty"))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest.json: not valid JSON"):
        read_manifest(str(tmp_path))
    bad = dict(m, dtype="float32")
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ShardError, match=r"manifest.json: dtype 'float32'"):
        read_manifest(str(tmp_path))


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sample(acts, t=None):
    t = acts.shape[0] if t is None else t
    return {"__key__": "train-000000-00000", "acts.npy": _npy(acts), "tok.npy": _npy(np.zeros(t, np.int32)),
            "ctx.npy": _npy(np.arange(t, dtype=np.int64)), "pos.npy": _npy(np.zeros(t, np.int32))}


def test_decode_block_validation():
    m = _manifest(4, "float16", 8, [])
    ok = decode_block(_sample(np.ones((3, 4), np.float16)), m, "s.tar")
    assert ok["acts"].shape == (3, 4) and ok["n_nonfinite"] == 0
    with pytest.raises(ShardError, match=r"s.tar \(block train-000000-00000\): acts shape is \(3, 5\)"):
        decode_block(_sample(np.ones((3, 5), np.float16)), m, "s.tar")
    with pytest.raises(ShardError, match=r"s.tar .*acts dtype is float32"):
        decode_block(_sample(np.ones((3, 4), np.float32)), m, "s.tar")
    with pytest.raises(ShardError, match=r"tok.npy is int32\(2,\), expected int32\(3,\)"):
        s = _sample(np.ones((3, 4), np.float16))
        s["tok.npy"] = _npy(np.zeros(2, np.int32))
        decode_block(s, m, "s.tar")
    s = _sample(np.ones((3, 4), np.float16))
    del s["pos.npy"]
    with pytest.raises(ShardError, match=r"missing members \['pos.npy'\]"):
        decode_block(s, m, "s.tar")
    s = _sample(np.ones((3, 4), np.float16))
    s["acts.npy"] = s["acts.npy"][:20]
    with pytest.raises(ShardError, match="not a valid .npy"):
        decode_block(s, m, "s.tar")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_block_nonfinite(dtype):
    x = torch.ones(4, 4)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    from lit_sae.data.shards import to_storage

    m = _manifest(4, dtype, 8, [])
    s = _sample(to_storage(x, dtype))
    with pytest.raises(ShardError, match=r"2 of 4 rows hold NaN/Inf .*skip_nonfinite"):
        decode_block(s, m, "s.tar")
    b = decode_block(s, m, "s.tar", nonfinite="drop")
    assert b["n_nonfinite"] == 2 and b["ctx"].tolist() == [0, 2]
    assert torch.isfinite(b["acts"].float()).all()


def test_iter_tar_reads_pax_gnu_and_webdataset_tars(tmp_path):
    """The fast tar reader handles what other writers produce: pax and GNU long names, webdataset's TarWriter."""
    import tarfile

    from lit_sae.data.shards import iter_tar

    long = "d/" + "x" * 150 + ".acts.npy"
    members = {"a.tok.npy": b"123", long: b"4" * 1000, "b\u00e9.ctx.npy": b""}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            assert dict(iter_tar(f, str(path))) == members
        with open(path, "rb") as f:  # select skips members without reading them
            assert [n for n, _ in iter_tar(f, str(path), select=lambda n: n.startswith("d/"))] == [long]
    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "k0", "txt": "hello"})
    with open(path, "rb") as f:
        assert dict(iter_tar(f, str(path))) == {"k0.txt": b"hello"}
    data = path.read_bytes()
    path.write_bytes(data[:512 + 512])  # header + data of the member, no end-of-archive marker
    with open(path, "rb") as f, pytest.raises(ShardError, match=r"wds.tar: truncated tar"):
        list(iter_tar(f, str(path)))


@pytest.mark.parametrize("cut", [None, 0.5, 0.0])
def test_mapped_and_streamed_reads_agree(tmp_path, cut):
    """A local shard is memory-mapped; a URL is streamed: same rows, same errors for a truncated file."""
    from lit_sae.data.reader import ShardRef, read_range

    x = torch.randn(40, 6)
    with ShardWriter(tmp_path, "train", 6, "float16", 8, 40) as w:
        w.add(x, torch.arange(40), torch.arange(40) // 4, torch.arange(40) % 4)
    m = _manifest(6, "float16", 8, w.written)
    path = tmp_path / "train-000000.tar"
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * cut)] if cut else data[:data.index(b"train-000000-00003.acts.npy")])
    ref = ShardRef(str(path), "train-000000.tar", 40)
    results = []
    for mapped in (True, False):
        try:
            pieces = [{k: np.array(v) for k, v in p.items()} for p in read_range([ref], m, 3, 37, {}, mapped)]
            results.append(({k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}, None))
        except ShardError as exn:
            results.append((None, str(exn)))
    (rows_m, err_m), (rows_s, err_s) = results
    if cut is None:
        assert err_m is err_s is None
        assert np.array_equal(rows_m["acts"], x[3:37].half().numpy()) and rows_m["tok"].tolist() == list(range(3, 37))
        assert all(np.array_equal(rows_m[k], rows_s[k]) for k in rows_m)
    else:
        assert err_m == err_s and "train-000000.tar: truncated tar" in err_m
