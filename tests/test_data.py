"""The real CIFAR path, end to end against a local HTTP server serving archives in the exact format."""

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from kdpipe import data as data_mod
from kdpipe import prepare
from kdpipe.cli import app

from .conftest import tiny_params, write_params


def make_cifar_archive(path, dataset="cifar10", n_train=200, n_test=50, seed=0):
    """A small archive laid out exactly like the official python-pickle CIFAR tarballs."""
    rng = np.random.default_rng(seed)
    spec = prepare.CIFAR[dataset]
    n_classes = 10 if dataset == "cifar10" else 100
    names = [f"class{i}".encode() for i in range(n_classes)]
    batches = {}
    per = n_train // len(spec.train)
    all_x, all_y = [], []
    for name in spec.train + (spec.test,):
        n = n_test if name == spec.test else per
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, n_classes, n).tolist()
        batches[name] = {b"batch_label": name.encode(), spec.label_key: y, b"data": x, b"filenames": []}
        all_x.append(x)
        all_y.append(y)
    batches[spec.meta] = {spec.names_key: names}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in batches.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return all_x, all_y


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except ConnectionError:  # the client may hang up early on a failed download
            pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve tmp_path/www on 127.0.0.1 (an ephemeral port) for the duration of a test."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_download_and_prepare_from_local_mirror(dataset, server, workdir, monkeypatch):
    www, url = server
    archive = www / prepare.CIFAR[dataset].filename
    xs, ys = make_cifar_archive(archive, dataset)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(prepare.CIFAR, dataset, prepare.CIFAR[dataset].__class__(
        **{**prepare.CIFAR[dataset].__dict__, "md5": md5}))
    write_params(workdir / "params.yaml", tiny_params(data={"dataset": dataset, "mirror": url}))

    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 0, result.output
    prepared = data_mod.load(workdir / "data/prepared")
    n_test = len(ys[-1])
    assert prepared.train.x.shape == (len(np.concatenate(ys[:-1])), 3, 32, 32)
    # the pixels round-trip exactly: N x 3072 rows -> N x 3 x 32 x 32 (channel-major, as CIFAR stores them)
    assert np.array_equal(prepared.train.x.numpy().reshape(-1, 3072), np.concatenate(xs[:-1]))
    assert np.array_equal(prepared.test.y.numpy(), np.array(ys[-1]))
    manifest = data_mod.read_manifest(workdir / "data/prepared")
    assert manifest.dataset == dataset and manifest.test_size == n_test
    assert manifest.num_classes == (10 if dataset == "cifar10" else 100)
    assert manifest.source == url + archive.name
    # a verified archive is not downloaded again
    archive.unlink()
    assert CliRunner().invoke(app, ["data"]).exit_code == 0


def test_mirror_from_environment_wins(monkeypatch):
    monkeypatch.setenv(prepare.MIRROR_ENV, "http://127.0.0.1:1/m")
    assert prepare.mirror_url("http://elsewhere/") == "http://127.0.0.1:1/m/"
    monkeypatch.delenv(prepare.MIRROR_ENV)
    assert prepare.mirror_url(None) == prepare.OFFICIAL_MIRROR


def test_corrupt_archive_is_rejected_and_nothing_written(server, workdir):
    www, url = server
    archive = www / prepare.CIFAR["cifar10"].filename
    make_cifar_archive(archive)  # its md5 is not the official one: treated as corrupt
    write_params(workdir / "params.yaml", tiny_params(data={"dataset": "cifar10", "mirror": url}))
    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 1
    assert "corrupt" in result.output and "md5" in result.output
    assert [line for line in result.output.splitlines() if "error" in line] == [result.output.strip().splitlines()[-1]]
    assert not (workdir / "data/prepared").exists()
    assert not (workdir / "data/raw" / archive.name).exists()


def test_truncated_archive_with_right_md5_gives_clear_error(server, workdir, monkeypatch):
    www, url = server
    archive = www / prepare.CIFAR["cifar10"].filename
    make_cifar_archive(archive)
    archive.write_bytes(archive.read_bytes()[:500])
    spec = prepare.CIFAR["cifar10"]
    monkeypatch.setitem(prepare.CIFAR, "cifar10", spec.__class__(
        **{**spec.__dict__, "md5": hashlib.md5(archive.read_bytes()).hexdigest()}))
    write_params(workdir / "params.yaml", tiny_params(data={"dataset": "cifar10", "mirror": url}))
    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 1 and "cannot read" in result.output
    assert not (workdir / "data/prepared").exists()


def test_unreachable_mirror_fails_cleanly(workdir, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    write_params(workdir / "params.yaml", tiny_params(data={"dataset": "cifar100", "mirror": "http://127.0.0.1:9/"}))
    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 1 and "download of http://127.0.0.1:9/cifar-100-python.tar.gz failed" in result.output
    assert "point data.mirror or KDPIPE_CIFAR_MIRROR to a base URL serving cifar-100-python.tar.gz" in result.output


def test_synthetic_prepare_is_byte_identical(workdir):
    assert CliRunner().invoke(app, ["data", "--out", "a"]).exit_code == 0
    assert CliRunner().invoke(app, ["data", "--out", "b"]).exit_code == 0
    for f in sorted((workdir / "a").iterdir()):
        assert f.read_bytes() == (workdir / "b" / f.name).read_bytes()


def test_load_detects_tampered_arrays(workdir):
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    arr = workdir / "data/prepared/train_y.npy"
    y = np.load(arr)
    y[0] = (y[0] + 1) % 10
    np.save(arr, y)
    with pytest.raises(data_mod.DataError, match="does not match manifest"):
        data_mod.load(workdir / "data/prepared")


def test_a_manifest_of_another_shape_is_one_line_naming_the_key(workdir):
    # the later stages read the manifest typed (config.Manifest): a hand-edited or foreign one fails at its key
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    mf = workdir / "data/prepared/manifest.json"
    manifest = json.loads(mf.read_text())
    assert data_mod.read_manifest(workdir / "data/prepared").image_size == manifest["image_size"] == 32
    del manifest["image_size"]
    mf.write_text(json.dumps(manifest))
    with pytest.raises(data_mod.DataError, match=r"manifest.json: not a manifest of `kdpipe data` \(image_size: Field required\)"):
        data_mod.load(workdir / "data/prepared")
    result = CliRunner().invoke(app, ["teacher"])
    assert result.exit_code != 0 and "image_size: Field required" in result.output
