"""tv/ and timm/ models (kdpipe/models/tv.py, timm_models.py): weights, feature taps, the library's layout.
All offline: named weights come from a cache this test fills, downloads are made to fail."""

import copy
import hashlib
import io
import sys
import urllib.error
import warnings
from pathlib import Path

import pytest
import timm  # the test install has kdpipe[timm]: a broken timm is a failure, not a skip
import torch
import torchvision
from torch import nn

from kdpipe.config import Error
from kdpipe.models import timm_models, tv
from kdpipe.models.library import WeightsError

from .conftest import ROOT

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs: one thread is as fast, and far faster than two OpenMP threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def create(name, num_classes, weights=None):
    """kdpipe.models.create's dispatch by prefix, done here so that this file tests the families alone."""
    family = tv if name.startswith(tv.PREFIX) else timm_models
    return family.create(name[len(family.PREFIX):], num_classes, weights)


def save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return str(path)


def same_params(a: dict, b: dict, skip=()) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if not k.startswith(skip))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """torch.hub's cache in an empty temporary folder ($TORCH_HOME/hub), and no network for torch.hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    return tmp_path / "hub"


# ---- torchvision weights ----

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tv_weights_file_gives_torchvision_logits(tmp_path, suffix):
    ref = torchvision.models.resnet18(num_classes=10).eval()
    model = create("tv/resnet18", 10, weights=save(ref.state_dict(), tmp_path / f"w{suffix}")).eval()
    with torch.no_grad():
        assert torch.equal(model(X), ref(X))


def test_tv_weights_file_for_another_class_count(tmp_path, capsys):
    ref = torchvision.models.resnet18()
    model = create("tv/resnet18", 10, weights=save(ref.state_dict(), tmp_path / "w.pth"))
    assert same_params(model.state_dict(), ref.state_dict(), skip=("fc.",)) and model.fc.out_features == 10
    assert "has 1000 classes; classifier replaced by a new one for 10 classes" in capsys.readouterr().err


def cache_as_torchvision_names_it(torch_home, monkeypatch, sd) -> Path:
    """`sd` saved in the cache as resnet18's IMAGENET1K_V1 file, named as torchvision names its files (the first 8
    hex digits of its sha256 in the name), the weights' URL pointed at that name on a closed local port."""
    (torch_home / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = torch_home / "checkpoints" / "tmp.pth"
    torch.save(sd, tmp)
    file = tmp.rename(tmp.with_name(f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"))
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/{file.name}")
    return file


def test_tv_named_weights_from_the_cache(torch_home, monkeypatch, capsys):
    sd = torchvision.models.resnet18().state_dict()  # random: what matters is the hash in the file's name
    cache_as_torchvision_names_it(torch_home, monkeypatch, sd)

    assert same_params(create("tv/resnet18", 1000, weights="IMAGENET1K_V1").state_dict(), sd)
    assert same_params(create("tv/resnet18", 1000, weights="DEFAULT").state_dict(), sd)
    assert "replaced" not in capsys.readouterr().err
    fine_tune = create("tv/resnet18", 10, weights="IMAGENET1K_V1")
    assert same_params(fine_tune.state_dict(), sd, skip=("fc.",))
    assert fine_tune.fc.weight.shape == (10, 512)
    assert capsys.readouterr().err.strip() == (
        "tv/resnet18: IMAGENET1K_V1 has 1000 classes; classifier replaced by a new one for 10 classes")


def test_a_cached_file_whose_hash_differs_from_its_name_is_refused(torch_home, monkeypatch):
    """torch.hub checks the hash in the name on download only: an offline copy put in the cache by hand is not."""
    file = cache_as_torchvision_names_it(torch_home, monkeypatch, torchvision.models.resnet18().state_dict())
    prefix = file.stem.rsplit("-", 1)[1]
    wrong = file.with_name("resnet18-00000000.pth")  # say, the wrong file under the expected name
    file.rename(wrong)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/{wrong.name}")
    with pytest.raises(WeightsError) as e:
        create("tv/resnet18", 10, weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg and f"{wrong} is not torchvision's IMAGENET1K_V1 file" in msg
    assert "sha256 does not start with 00000000" in msg and prefix not in msg


def test_tv_offline_with_an_empty_cache(torch_home):
    with pytest.raises(WeightsError) as e:
        create("tv/resnet18", 10, weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, Error)
    assert str(torch_home / "checkpoints" / "resnet18-f37072fd.pth") in msg and "download.pytorch.org" in msg


def test_offline_cli_is_one_line_with_the_documented_exit_code(tmp_path, monkeypatch):
    """No network (a closed local port), an empty cache: one error line naming where to put the file, exit 1 as
    docs/models.md says, no torch.hub "Downloading: ..." line, nothing written."""
    from typer.testing import CliRunner

    from kdpipe.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url",
                        "http://127.0.0.1:9/resnet18-f37072fd.pth")
    result = CliRunner().invoke(app, ["import-teacher", "IMAGENET1K_V1", "--model", "tv/resnet18", "--name", "t",
                                      "--dataset", "imagenet", "--num-classes", "1000",
                                      "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"])
    file = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: tv/resnet18: cannot download http://127.0.0.1:9/resnet18-f37072fd.pth")
    assert result.stderr.endswith(f"; offline, put that file at {file}\n") and result.stderr.count("\n") == 1
    assert not (tmp_path / "models").exists()
    offline_doc = (ROOT / "docs/models.md").read_text().split("Offline with no")[1].split("written")[0]
    assert "exit 1 " in offline_doc and "exit 2" not in offline_doc


def test_weights_and_name_errors(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file not found"):
        create("tv/resnet18", 10, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match=r"unknown weights 'IMAGENET1K_V9'; valid: DEFAULT, IMAGENET1K_V1"):
        create("tv/resnet18", 10, weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"unknown model 'tv/resnet19'.*list_models"):
        create("tv/resnet19", 10)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"does not fit: conv1.weight has shape \(1,\)") as e:
        create("tv/resnet18", 10, weights=str(tmp_path / "other.pth"))
    assert "\n" not in str(e.value)


# ---- timm ----

def test_timm_absent_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ValueError, match=r"^timm/resnet18 needs timm: pip install 'kdpipe\[timm\]'$"):
        create("timm/resnet18", 10)


def test_timm_weights_file(tmp_path, capsys):
    ref = timm.create_model("resnet18", num_classes=10).eval()
    model = create("timm/resnet18", 10, weights=save(ref.state_dict(), tmp_path / "w.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(model(X), ref(X))
    assert capsys.readouterr().err == ""

    big = timm.create_model("resnet18")  # 1000 classes: timm drops the classifier for 10
    model = create("timm/resnet18", 10, weights=save(big.state_dict(), tmp_path / "big.pth"))
    assert same_params(model.state_dict(), big.state_dict(), skip=("fc.",)) and model.fc.out_features == 10
    assert "has 1000 classes; classifier replaced by a new one for 10 classes" in capsys.readouterr().err


def test_timm_offline_and_errors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set both
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as e:
        create("timm/resnet18", 10, weights="pretrained")
    msg = str(e.value)
    assert "\n" not in msg and "timm/resnet18.a1_in1k" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(WeightsError, match=r"unknown weights 'nope'; valid: pretrained, a1_in1k"):
        create("timm/resnet18", 10, weights="nope")
    with pytest.raises(WeightsError, match=r"weights file not found"):
        create("timm/resnet18", 10, weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"unknown model 'timm/resnet19'"):
        create("timm/resnet19", 10)
    with pytest.raises(ValueError, match=r"Invalid pretrained tag \(bogus\)"):
        create("timm/resnet18.bogus", 10)


# ---- the library's models, unchanged ----

@pytest.mark.parametrize("name, library", [
    ("tv/resnet18", lambda: torchvision.models.resnet18()),
    ("tv/mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small()),
    ("timm/resnet18", lambda: timm.create_model("resnet18")),
    ("timm/mobilenetv3_small_100", lambda: timm.create_model("mobilenetv3_small_100")),
])
def test_parameter_counts_and_keys_are_the_librarys(name, library):
    ours, theirs = create(name, 1000), library()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, type(theirs))


def test_tv_model_survives_copies_layouts_and_module_swaps():
    model = create("tv/resnet18", 10).eval()
    plain = torchvision.models.resnet18(num_classes=10).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    plain.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))  # strict: same keys
    with torch.no_grad():
        ref = plain(X)
        twin = copy.deepcopy(model)
        nn.init.zeros_(model.fc.weight)  # the copy has its own parameters, and its taps use them
        assert torch.equal(twin(X, features=True).logits, ref)
        twin.to(memory_format=torch.channels_last)
        last = twin(X.contiguous(memory_format=torch.channels_last), features=True)
        torch.testing.assert_close(last.logits, ref)
        # SyncBatchNorm replaces the BN modules (kdpipe.runtime.wrap under DDP): the taps must use the new ones
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(twin)
        calls = []
        synced.bn1.register_forward_hook(lambda *a: calls.append(1))
        torch.testing.assert_close(synced(X, features=True).logits, ref)
        assert calls == [1]
    with warnings.catch_warnings():  # the plain forward stays traceable (kdpipe export --format torchscript)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        traced = torch.jit.trace(model, (X,))
    with torch.no_grad():
        assert torch.equal(traced(X), model(X))


# ---- feature taps ----

FEATURE_MODELS = {
    "tv/resnet18": lambda m: m.fc.in_features,
    "tv/mobilenet_v3_small": lambda m: m.classifier[0].in_features,  # the classifier block's input (576)
    "tv/resnet50": lambda m: m.fc.in_features,
    "timm/resnet18": lambda m: m.get_classifier().in_features,
}


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_feature_taps(name):
    model = create(name, 10).eval()
    with torch.no_grad():
        out = model(X, features=True)
        assert torch.equal(out.logits, model(X))
    logits, stages = out  # the (logits, stages) pair of kdpipe's contract
    assert len(stages) >= 4 and all(s.dim() == 4 and s.shape[0] == 2 for s in stages)
    sizes = [s.shape[-1] for s in stages]
    assert sizes == sorted(set(sizes), reverse=True) and sizes[0] == 32  # the stride-2 stem first, then halving
    assert out.embedding.shape == (2, FEATURE_MODELS[name](model))
    assert len(out.preact) == len(stages)

    model.train()
    out = model(X, features=True)
    sum(s.sum() for s in out.stages).backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_tv_resnet_preact_taps_are_before_the_relu():
    model = create("tv/resnet18", 10).eval()
    with torch.no_grad():
        out = model(X, features=True)
    assert out.preact[0] is out.stages[0]  # the stem's tap is post-ReLU, as in kdpipe's own models
    for pre, post in zip(out.preact[1:], out.stages[1:]):
        assert (pre < 0).any() and torch.equal(torch.relu(pre), post)  # not overwritten by the in-place ReLU
