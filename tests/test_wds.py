"""``wds:`` shards: writing them from other specs, reading them back, streaming them to ranks.

Ranks are simulated by giving the training loader a ``Dist(rank=r, world=w)`` (it needs no process
group to build its batches); the loop integration is checked by a real training run on a streamed
split, stopped and resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, shared_path
from tests.test_engine import cfg_for, make_folder
from vistune.data import DataError, load_data
from vistune.data.__main__ import main as data_main
from vistune.data.wds import assign_shards
from vistune.engine.distributed import Dist, StreamedLoader

pytest.importorskip("webdataset")
pytestmark = pytest.mark.usefixtures("one_thread")


def shard(spec: str, out: Path, size: int, *extra: str) -> None:
    assert data_main(["shard", spec, "--out", str(out), "--shard-size", str(size), *extra]) == 0


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 3-class folder (8/3/4 per class) and its shards, 5 samples per shard (5 train shards)."""
    root = tmp_path_factory.mktemp("wds")
    folder = make_folder(root / "folder", classes=3, per_class=8)
    shard(f"folder:{folder}", root / "shards", 5)
    return folder, root / "shards"


def fingerprint(ds) -> list[tuple[str, int]]:
    """Each item's decoded pixels (hashed) and label, sorted: the split as a multiset."""
    return sorted((hashlib.sha1(ds.uint8(i).numpy().tobytes()).hexdigest(), ds.targets[i]) for i in range(len(ds)))


def epoch_items(data, world: int, seed: int, workers: int = 0, batch: int = 6) -> list[list[tuple[float, int]]]:
    """What each simulated rank trains on in one epoch: per rank, (pixel sum, label) per item."""
    seen = []
    for rank in range(world):
        loader = Dist(rank=rank, world=world).train_loader(data.train, batch, seed=seed, num_workers=workers)
        assert isinstance(loader, StreamedLoader)
        items = []
        for step, (b, n_global) in enumerate(loader):
            assert n_global == loader.global_size(step)
            if b is not None:
                items += [(round(float(x.double().sum()), 2), int(y)) for x, y in zip(*b)]
        seen.append(items)
    return seen


# ----------------------------------------------------------------------------- write and read back


def test_folder_round_trip_gives_the_same_samples_and_labels_with_the_bytes_as_stored(sharded):
    folder, shards = sharded
    names = sorted(p.name for p in shards.iterdir())
    assert names == ["classes.json", *(f"test-{i:06d}.tar" for i in range(3)), *(f"train-{i:06d}.tar" for i in range(5)),
                     "val-000000.tar", "val-000001.tar"]
    meta = json.loads((shards / "classes.json").read_text())
    assert meta["classes"] == ["class0", "class1", "class2"]
    assert meta["splits"] == {"train": {"shards": 5, "samples": 24}, "val": {"shards": 2, "samples": 9},
                              "test": {"shards": 3, "samples": 12}}
    a = load_data(f"folder:{folder}", img_size=16)
    b = load_data(f"wds:{shards}", img_size=16)
    assert b.class_names == a.class_names
    for split in ("train", "val", "test"):
        assert fingerprint(getattr(b, split)) == fingerprint(getattr(a, split)), split
    # no re-encode: every image member is the source file's bytes, under its own extension
    with tarfile.open(shards / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    assert len(keys) == 5
    for key in keys:
        source = members[f"{key}.id"].decode()
        assert members[f"{key}.png"] == (folder / source).read_bytes()
        label = a.class_names.index(Path(source).parent.name)
        assert int(members[f"{key}.cls"]) == label


def test_a_brace_pattern_names_the_train_shards_and_jpeg_bytes_stay_as_they_are(tmp_path):
    # an npz of JPEG bytes (the ../shared layout) keeps its JPEG bytes; 4 classes x 6 train images
    rng = np.random.default_rng(0)
    blobs, labels = [], []
    for i in range(24):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        labels.append(i % 4)
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    npz = tmp_path / "j.npz"
    np.savez(npz, train_jpeg=np.frombuffer(b"".join(blobs), np.uint8), train_offsets=offsets,
             train_labels=np.array(labels), test_jpeg=np.frombuffer(b"".join(blobs[:8]), np.uint8),
             test_offsets=offsets[:9], test_labels=np.array(labels[:8]))
    shard(f"npz:{npz}", tmp_path / "s", 4, "--keep-order")
    stored = {}
    for p in sorted((tmp_path / "s").glob("*.tar")):
        with tarfile.open(p) as tar:
            stored[p.name] = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    train_val = [b for name, blobs_ in stored.items() if not name.startswith("test") for b in blobs_]
    assert sorted(train_val) == sorted(blobs)  # val carved from train, every JPEG copied byte for byte
    assert [b for name in sorted(stored) if name.startswith("test") for b in stored[name]] == blobs[:8]
    d = load_data(f"wds:{tmp_path / 's'}/train-{{000000..000001}}.tar", img_size=12)
    assert d.info["notes"][0] == "wds shards: train=2, val=1, test=2"  # val/test: the shards beside them
    assert len(d.train) == 8 and len(d.test) == 8


def test_npz_arrays_are_encoded_once_as_lossless_png(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (12, 9, 9), dtype=np.uint8)  # grey arrays: no encoded bytes to copy
    npz = tmp_path / "a.npz"
    np.savez(npz, train_images=images, train_labels=np.arange(12) % 3)
    shard(f"npz:{npz}", tmp_path / "s", 100, "--keep-order")
    seen = 0
    for p in (tmp_path / "s").glob("*.tar"):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    row = int(tar.extractfile(m.name.replace(".png", ".id")).read().decode().rpartition(":")[2])
                    assert np.array_equal(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))), images[row])
                    seen += 1
    assert seen == 12


# ----------------------------------------------------------------------------- streaming


def test_ranks_and_workers_see_every_sample_once_per_epoch(sharded):
    _, shards = sharded
    data = load_data(f"wds:{shards}", img_size=8, cache_mb=0)
    assert data.train.stream is not None and data.info["streamed"] == "train"
    one = epoch_items(data, world=1, seed=3)
    assert len(one[0]) == 24 and len(set(one[0])) == 24  # distinct images: a duplicate would show
    for world, workers in ((2, 0), (2, 2), (3, 1)):
        ranks = epoch_items(data, world=world, seed=3, workers=workers)
        assert Counter(x for r in ranks for x in r) == Counter(one[0]), (world, workers)
    # every rank takes the same number of steps (the gradient all-reduce needs it)
    lens = {len(Dist(rank=r, world=2).train_loader(data.train, 6, seed=0)) for r in range(2)}
    assert len(lens) == 1


def test_same_seed_same_order_and_another_epoch_another_order(sharded):
    _, shards = sharded
    data = load_data(f"wds:{shards}", img_size=8, cache_mb=0)
    first = epoch_items(data, world=2, seed=4, workers=2)
    assert epoch_items(data, world=2, seed=4, workers=2) == first  # a resumed epoch reads the same batches
    later = epoch_items(data, world=2, seed=5, workers=2)
    assert later != first and [Counter(r) for r in later] == [Counter(r) for r in first]


def test_shards_are_balanced_over_ranks():
    parts = assign_shards([10, 10, 10, 10, 3], 2)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]
    assert sorted(sum([10, 10, 10, 10, 3][i] for i in p) for p in parts) == [20, 23]


def test_a_streamed_run_resumed_at_an_epoch_boundary_matches_the_uninterrupted_one(sharded, tmp_path):
    from vistune.workflows.train import train

    _, shards = sharded
    data = load_data(f"wds:{shards}", img_size=32, cache_mb=0)
    assert data.train.stream is not None
    kw = {"method": "lora", "epochs": 3, "batch_size": 6, "data": f"wds:{shards}"}
    full = train(cfg_for(shards, tmp_path / "a", **kw), data=data)
    cfg = cfg_for(shards, tmp_path / "b", **kw)
    assert train(cfg, data=data, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    resumed = train(cfg, data=data, resume=True)
    assert resumed["test_loss"] == full["test_loss"] and resumed["num_train"] == 24
    la = [json.loads(x)["train_loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["train_loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert la == lb and len(set(la)) == 3


def test_too_few_shards_for_the_ranks_is_one_clear_error(sharded):
    _, shards = sharded
    few = load_data(f"wds:{shards}", img_size=8, cache_mb=0, shots=2)
    assert few.train.stream is None  # a few-shot subset is read by index, not streamed
    whole = load_data(f"wds:{shards}", img_size=8, cache_mb=0)
    with pytest.raises(DataError, match="5 training shards cannot feed 6 processes"):
        Dist(rank=0, world=6).train_loader(whole.train, 12, seed=0)


# ----------------------------------------------------------------------------- bad input


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["no-match", "missing-shard", "no-cls", "no-image", "empty-folder"])
def test_bad_shards_are_one_line_and_exit_2(tmp_path, capsys, case):
    d = tmp_path / "d"
    d.mkdir()
    spec, expect = f"wds:{d}", ""
    if case == "no-match":
        spec, expect = f"wds:{d}/train-*.tar", "matches no file"
    elif case == "missing-shard":
        _tar(d / "train-000000.tar", {"a.png": _png(), "a.cls": b"0", "b.png": _png(), "b.cls": b"1"})
        spec, expect = f"wds:{d}/train-{{000000..000001}}.tar", "train-000001.tar (from the pattern"
    elif case == "no-cls":
        _tar(d / "train-000000.tar", {"a.png": _png(), "a.cls": b"0", "b.png": _png()})
        expect = "sample 'b' has no a .cls member (the integer label); its members: b.png"
    elif case == "no-image":
        _tar(d / "train-000000.tar", {"a.png": _png(), "a.cls": b"0", "b.txt": b"x", "b.cls": b"1"})
        expect = "sample 'b' has no an image member"
    else:
        expect = "no train-*.tar shards in"
    assert data_main(["fetch", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    if case in ("no-cls", "no-image"):
        assert str(d / "train-000000.tar") in err
    from vistune.cli import (
        main as cli_main,  # training refuses it the same way, before anything is written
    )

    out = tmp_path / "run"
    assert cli_main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data", spec,
                     "--out", str(out), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (out / "metrics.json").exists()


def test_shard_writes_nothing_when_it_fails_midway(sharded, tmp_path, capsys, monkeypatch):
    folder, shards = sharded
    from vistune.data import sources

    calls = {"n": 0}
    real = sources.FileImages.encoded

    def interrupted_late(self, sample_id):
        calls["n"] += 1
        if calls["n"] > 30:  # after several shards were complete: Ctrl-C
            raise KeyboardInterrupt
        return real(self, sample_id)

    monkeypatch.setattr(sources.FileImages, "encoded", lambda self, sid: (_ for _ in ()).throw(OSError("gone")))
    out = tmp_path / "out"
    assert data_main(["shard", f"folder:{folder}", "--out", str(out), "--shard-size", "5"]) == 2
    assert "every image of train-000000.tar" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    monkeypatch.setattr(sources.FileImages, "encoded", interrupted_late)
    with pytest.raises(KeyboardInterrupt):
        data_main(["shard", f"folder:{folder}", "--out", str(out), "--shard-size", "5"])
    assert calls["n"] == 31 and list(out.iterdir()) == []  # no shard, no temp file, no classes.json
    # an out folder that already holds shards is refused (two data sets must not mix)
    assert data_main(["shard", f"folder:{folder}", "--out", str(shards), "--shard-size", "5"]) == 2
    assert "already holds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- PVP on Tiny-ImageNet


def test_pretrain_from_tinyimagenet_shards_gives_the_modules_of_the_npz(tmp_path):
    """Same bytes, same order (``--keep-order``), decoded into the cache: the very same modules."""
    from safetensors.torch import load_file

    from vistune.cli import main as cli_main

    npz = shared_path("data", "tinyimagenet", "tinyimagenet200_val_train20_jpeg.npz")
    shard(f"npz:{npz}", tmp_path / "s", 5000, "--keep-order")
    runs = {}
    for name, spec in (("npz", f"npz:{npz}"), ("wds", f"wds:{tmp_path / 's'}")):
        out = tmp_path / name
        assert cli_main(["pretrain", "--backbone", "test_vit", "--img-size", "32", "--method", "vpt", "-o", "length=2",
                         "--data", spec, "--max-per-split", "200", "--epochs", "1", "--batch-size", "20",
                         "--lr", "0.05", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
        runs[name] = load_file(out / "modules.safetensors")
    assert runs["npz"].keys() == runs["wds"].keys()
    for key in runs["npz"]:
        assert torch.equal(runs["npz"][key], runs["wds"][key]), key


def test_read_benchmark_runs_on_a_tiny_input(sharded):
    """benchmarks/wds_read.py end to end on 20 images (its numbers are measured elsewhere, alone)."""
    folder, _ = sharded
    proc = run_script(Path(__file__).resolve().parents[1] / "benchmarks" / "wds_read.py", "--data", f"folder:{folder}",
                      "--limit", "20", "--img-size", "16", "--workers", "1", "--shard-size", "5", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| ") and "source" not in ln]
    assert [r[0] for r in rows] == ["wds (streamed)", "npz (by index)", "folder (by index)"]
    assert all(r[2] == "20" for r in rows)  # every copy read all 20 images once

