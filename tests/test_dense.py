"""Dense prediction: features, heads, geometry, metrics, readers, a tiny overfit, files, predict.

Fixtures are generated: scenes of solid rectangles on a grey floor, written in CamVid, VOC and
Penn-Fudan layouts, so every label's true position is known exactly. Tiny random timm models
(``test_vit``, ``test_efficientnet``) keep the whole file CPU-fast; the real data folders in
../shared are read when present and skipped with the reason when not.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.config import TrainConfig
from vistune.data.errors import DataError
from vistune.dense import (
    DetectionMetric,
    SegmentationMetric,
    build_dense_model,
    is_dense_run,
    load_dense,
    load_dense_data,
    predict,
    save_dense,
)
from vistune.dense.datasets import (
    IGNORE,
    boxes_from_instance_mask,
    hflip,
    letterbox_geometry,
    letterbox_image,
    letterbox_mask,
)
from vistune.dense.features import FeatureError
from vistune.backbones import seeded_backbone
from vistune.tuning import attach
from vistune.workflows.train import evaluate_run, train

from conftest import shared_path



pytestmark = pytest.mark.usefixtures("one_thread")


FLOOR = (128, 128, 128)
COLOURS = {1: (230, 30, 30), 2: (30, 220, 30)}  # class id -> RGB
# Four scenes (W=64, H=48): (class, x1, y1, x2, y2) rectangles in continuous pixel coordinates.
SCENES = [
    [(1, 4, 6, 28, 30), (2, 36, 10, 60, 40)],
    [(2, 2, 2, 26, 26), (1, 34, 18, 62, 46)],
    [(1, 20, 12, 44, 36)],
    [(2, 8, 20, 32, 44), (1, 40, 2, 62, 24)],
]
W, H = 64, 48


def scene(rects) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """RGB image, class-index mask and instance mask of one scene."""
    img = np.zeros((H, W, 3), dtype=np.uint8) + np.array(FLOOR, dtype=np.uint8)
    cls = np.zeros((H, W), dtype=np.uint8)
    inst = np.zeros((H, W), dtype=np.uint8)
    for k, (c, x1, y1, x2, y2) in enumerate(rects, start=1):
        img[y1:y2, x1:x2] = COLOURS[c]
        cls[y1:y2, x1:x2] = c
        inst[y1:y2, x1:x2] = k
    return Image.fromarray(img), cls, inst


def make_camvid(root: Path, splits=("train", "val", "test"), classes=("floor", "red", "green")) -> Path:
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i, rects in enumerate(SCENES):
            img, cls, _ = scene(rects)
            img.save(root / split / f"s{i}.jpg", quality=95)
            Image.fromarray(cls, mode="L").save(root / f"{split}annot" / f"s{i}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def voc_xml(name: str, rects, extra_objects: str = "") -> str:
    names = {1: "red", 2: "green"}
    objs = "".join(
        f"<object><name>{names[c]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
        f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for c, x1, y1, x2, y2 in rects
    )
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size>{objs}{extra_objects}</annotation>")


def make_voc(root: Path, extra_objects: str = "") -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i, rects in enumerate(SCENES):
        scene(rects)[0].save(root / "JPEGImages" / f"s{i}.jpg", quality=95)
        (root / "Annotations" / f"s{i}.xml").write_text(voc_xml(f"s{i}", rects, extra_objects if i == 0 else ""))
    ids = "\n".join(f"s{i}" for i in range(len(SCENES))) + "\n"
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
    return root


def make_pennfudan(root: Path, n: int = 10) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, _, inst = scene(SCENES[i % len(SCENES)])
        img.save(root / "images" / f"P{i:03d}.jpg", quality=95)
        Image.fromarray(inst, mode="L").save(root / "masks" / f"P{i:03d}_mask.png")
    return root


def tiny_cfg(tmp_path: Path, data: str, method: str = "linear", **kw) -> TrainConfig:
    base = dict(backbone="test_vit", img_size=64, method=method, data=data, epochs=3, batch_size=4,
                lr=1e-2, optimizer="adamw", wd=0.0, warmup_epochs=0.0, out=str(tmp_path / "run"),
                progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ features, heads

ARCHS = [("test_vit", 64), ("test_efficientnet", 64)]


@pytest.mark.parametrize("arch,size", ARCHS)
@pytest.mark.parametrize("task", ["segment", "detect"])
def test_head_output_shapes(arch, size, task):
    tuned = attach(seeded_backbone(arch, None, size), "linear")
    model = build_dense_model(tuned, task, num_classes=3).eval()
    x = torch.randn(2, 3, size, size)
    feats = model.features(x)
    assert len(feats) == (4 if task == "segment" else 3)  # detection keeps strides ~8-32
    if task == "segment":
        assert model(x).shape == (2, 3, size, size)
    else:
        out = model(x)
        strides = model.head.task_head.strides
        n = sum((size // int(s)) ** 2 for s in strides)
        assert out["cls"].shape == (2, n, 3) and out["box"].shape == (2, n, 4) and out["ctr"].shape == (2, n)
        dets = model.head.task_head.detections(out)
        assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)


def test_vit_pyramid_is_read_after_norm_and_resampled():
    model = seeded_backbone("test_vit", None, 64).eval()
    tuned = attach(model, "linear")
    dense = build_dense_model(tuned, "segment", 2)
    x = torch.randn(1, 3, 64, 64)
    feats = dense.features(x)
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
    last = tokens.transpose(1, 2).reshape(1, -1, 4, 4)
    torch.testing.assert_close(feats[-1], last)  # last block, normed: what forward_features returns
    levels = dense.head.cfg.level_objs()
    assert [lv.index for lv in levels] == [0, 2, 3, 5]
    assert [lv.stride for lv in levels] == [4.0, 8.0, 16.0, 32.0]
    pyramid = dense.head.neck(feats)
    assert [p.shape[-1] for p in pyramid] == [16, 8, 4, 2]


def test_vpt_prompts_are_stripped_from_every_level():
    model = seeded_backbone("test_vit", None, 64).eval()
    tuned = attach(model, "vpt", length=5, deep=True)
    dense = build_dense_model(tuned, "segment", 2)
    feats = dense.features(torch.randn(2, 3, 64, 64))
    assert all(f.shape == (2, 64, 4, 4) for f in feats)
    # the final level equals the prompted model's own patch tokens (prompts stripped by VPT itself)
    x = torch.randn(1, 3, 64, 64)
    tokens = model.forward_features(x)[:, model.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, 4, 4)
    torch.testing.assert_close(dense.features(x)[-1], tokens)


def test_protuning_prompts_reach_the_features():
    model = seeded_backbone("test_efficientnet", None, 64).eval()
    tuned = attach(model, "protuning")
    dense = build_dense_model(tuned, "segment", 2)
    x = torch.randn(1, 3, 64, 64)
    before = [f.clone() for f in dense.features(x)]
    with torch.no_grad():
        for block in model.protuning.values():
            block.expand.bias.fill_(0.5)
    after = dense.features(x)
    assert all(not torch.allclose(a, b) for a, b in zip(after, before))


def test_wrong_token_count_is_a_clear_error():
    model = seeded_backbone("test_vit", None, 64).eval()
    dense = build_dense_model(attach(model, "linear"), "segment", 2)
    model.num_prefix_tokens = 3  # lie about the prefix: the grid can no longer be found
    with pytest.raises(FeatureError, match="prefix tokens"):
        dense.features(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------ geometry


def _check_aligned(canvas, mask, boxes, classes):
    for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
        cid = classes[k]
        region = mask[y1:y2, x1:x2]
        assert (region == cid).float().mean() > 0.95  # the box covers its own mask...
        assert (mask == cid).sum() == region.eq(cid).sum()  # ...and all of it
        assert (canvas[0, y1:y2, x1:x2].mean() > 180) == (cid == 1)  # and the image's red is there


@pytest.mark.parametrize("portrait", [False, True])
def test_letterbox_and_flip_keep_image_mask_and_boxes_aligned(portrait):
    img, cls, inst = scene(SCENES[0])
    if portrait:  # 48x64: the padding is on the right, and a flip moves it to the left
        img, cls, inst = img.transpose(Image.Transpose.TRANSPOSE), cls.T.copy(), inst.T.copy()
    lb = letterbox_geometry(img.width, img.height, 32)
    assert (lb.new_w, lb.new_h) == ((24, 32) if portrait else (32, 24)) and lb.sx == lb.sy == 0.5
    canvas = torch.from_numpy(letterbox_image(img, lb)).float()
    mask = torch.from_numpy(letterbox_mask(cls, lb)).long()
    orig = boxes_from_instance_mask(inst)
    boxes = torch.from_numpy(lb.boxes_to_canvas(orig))
    expected = torch.tensor([[2.0, 3, 14, 15], [18, 5, 30, 20]])
    torch.testing.assert_close(boxes, expected[:, [1, 0, 3, 2]] if portrait else expected)
    pad = (mask[:, 24:], canvas[:, :, 24:]) if portrait else (mask[24:], canvas[:, 24:])
    assert (pad[0] == IGNORE).all() and (pad[1] == 0).all()
    classes = [r[0] for r in SCENES[0]]
    _check_aligned(canvas, mask, boxes, classes)
    c2, m2, b2 = hflip(canvas, mask, boxes)
    _check_aligned(c2, m2, b2, classes)
    if portrait:
        assert (m2[:, :8] == IGNORE).all() and (m2[:, 8:] != IGNORE).all()
    torch.testing.assert_close(hflip(c2, m2, b2)[2], boxes)  # flipping twice is the identity
    torch.testing.assert_close(lb.boxes_to_original(boxes.clone()), torch.from_numpy(orig))


def test_dataset_flip_is_consistent(tmp_path):
    voc = make_voc(tmp_path / "voc")
    d = load_dense_data(f"voc:{voc}", "detect", img_size=32, mean=(0, 0, 0), std=(1, 1, 1), augment="flip")
    x0, t0 = d.train.item(0, False)
    x1, t1 = d.train.item(0, True)
    torch.testing.assert_close(x1, x0.flip(-1))
    torch.testing.assert_close(t1["boxes"][:, [0, 2]], 32 - t0["boxes"][:, [2, 0]])
    assert d.val is not None and not d.val.flip and d.train.flip


# ------------------------------------------------------------------------------ metrics


def test_segmentation_metric_perfect_partial_and_reference():
    from torchmetrics.classification import MulticlassJaccardIndex

    m = SegmentationMetric(3)
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 0, IGNORE]])
    m.update(t.clone(), t)
    assert m.compute()["miou"] == 1.0
    gt = torch.tensor([0, 0, 1, 1, IGNORE])
    pred = torch.tensor([0, 1, 1, 1, 0])
    m = SegmentationMetric(3)  # class 2 absent everywhere: no IoU, not in the mean
    m.update(pred, gt)
    r = m.compute()
    assert r["per_class_iou"][:2] == pytest.approx([1 / 2, 2 / 3]) and r["per_class_iou"][2] is None
    assert r["miou"] == pytest.approx(7 / 12) and r["pixels"] == 4
    ref = MulticlassJaccardIndex(2, average="none", ignore_index=IGNORE)(pred, gt)
    assert r["per_class_iou"][:2] == pytest.approx(ref.tolist())


def test_detection_metric_perfect_and_known_partial():
    gt = [{"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 50, 70, 70]]), "labels": torch.tensor([0, 0])}]
    m = DetectionMetric(1)
    m.update([{"boxes": gt[0]["boxes"], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}], gt)
    r = m.compute()
    assert r["map"] == pytest.approx(1.0) and r["map_50"] == pytest.approx(1.0)
    # One exact hit; the second box is shifted to IoU 2/3: matched at IoU 0.50-0.65, missed above.
    # COCO's 101-point AP at a threshold where it misses: precision 1 up to recall 0.5 -> 51/101.
    pred = {"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 54, 70, 74]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 0])}
    m = DetectionMetric(1)
    m.update([pred], gt)
    r = m.compute()
    half = 51 / 101
    assert r["map_50"] == pytest.approx(1.0) and r["map_75"] == pytest.approx(half, abs=1e-4)
    assert r["map"] == pytest.approx((4 + 6 * half) / 10, abs=1e-4)


# ------------------------------------------------------------------------------ readers


def test_camvid_reader_on_fixture(tmp_path):
    root = make_camvid(tmp_path / "cv")
    d = load_dense_data(f"camvid:{root}", "segment", img_size=32)
    assert d.class_names == ["floor", "red", "green"] and len(d.train) == len(d.test) == 4
    s = d.train.samples[0]
    assert s.orig_mask.shape == (H, W) and s.mask.shape == (32, 32)
    assert (s.mask[24:] == IGNORE).all() and set(np.unique(s.mask[:24])) <= {0, 1, 2}


def test_camvid_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dense_data(f"camvid:{tmp_path / 'nope'}", "segment", img_size=32)
    with pytest.raises(DataError, match="not one of"):
        load_dense_data(f"coco:{tmp_path}", "segment", img_size=32)
    root = make_camvid(tmp_path / "cv")
    with pytest.raises(DataError, match="serves segment"):
        load_dense_data(f"camvid:{root}", "detect", img_size=32)
    Image.fromarray(np.full((H, W), 7, dtype=np.uint8), mode="L").save(root / "trainannot" / "s1.png")
    with pytest.raises(DataError, match=r"s1\.png has value 7"):
        load_dense_data(f"camvid:{root}", "segment", img_size=32)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="L").save(root / "trainannot" / "s1.png")
    with pytest.raises(DataError, match=r"s1\.png is 10x10"):
        load_dense_data(f"camvid:{root}", "segment", img_size=32)
    (root / "trainannot" / "s1.png").unlink()
    with pytest.raises(DataError, match=r"no mask .*s1\.png"):
        load_dense_data(f"camvid:{root}", "segment", img_size=32)


def test_camvid_void_value_is_ignored(tmp_path):
    root = make_camvid(tmp_path / "cv")
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, :10] = 3  # == len(classes): the void value
    Image.fromarray(mask, mode="L").save(root / "testannot" / "s0.png")
    d = load_dense_data(f"camvid:{root}", "segment", img_size=32)
    assert (d.test.samples[0].orig_mask[:, :10] == IGNORE).all()


def test_voc_reader_coordinates_and_zero_area(tmp_path):
    zero = "<object><name>red</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>"
    root = make_voc(tmp_path / "voc", extra_objects=zero)
    d = load_dense_data(f"voc:{root}", "detect", img_size=32)
    assert d.class_names == ["green", "red"]
    assert d.info["dropped_zero_area_boxes"] == 3  # once per split file listing s0
    s = d.train.samples[0]
    np.testing.assert_allclose(s.orig_boxes, [[4, 6, 28, 30], [36, 10, 60, 40]])  # 1-based -> continuous
    np.testing.assert_allclose(s.boxes, np.asarray(s.orig_boxes) / 2)
    assert s.labels.tolist() == [1, 0]


@pytest.mark.parametrize("xml,match", [
    ("<annotation><object><name>x</name><bndbox><xmin>1</xmin></bndbox></object></annotation>", "bndbox/ymin"),
    ("<annotation><object><name>x</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>", "not a number"),
    ("<annotation><object>", "not readable XML"),
    ("<annotation><object><bndbox/></object></annotation>", "no <name>"),
])
def test_voc_malformed_annotations_name_the_file(tmp_path, xml, match):
    root = make_voc(tmp_path / "voc")
    (root / "Annotations" / "s2.xml").write_text(xml)
    with pytest.raises(DataError, match=match) as err:
        load_dense_data(f"voc:{root}", "detect", img_size=32)
    assert "s2.xml" in str(err.value)


def test_voc_missing_pieces(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        load_dense_data(f"voc:{root}", "detect", img_size=32)
    (root / "ImageSets" / "Main" / "test.txt").write_text("s0\nghost\n")
    with pytest.raises(DataError, match="ghost"):
        load_dense_data(f"voc:{root}", "detect", img_size=32)


def test_pennfudan_reader_split_and_boxes(tmp_path):
    root = make_pennfudan(tmp_path / "pf")
    a = load_dense_data(f"pennfudan:{root}", "detect", img_size=32)
    b = load_dense_data(f"pennfudan:{root}", "detect", img_size=32)
    assert a.manifest()["splits"] == b.manifest()["splits"]  # seeded: the same every time
    ids = [set(getattr(a, s).ids) for s in ("train", "val", "test")]
    assert sum(map(len, ids)) == 10 and not (ids[0] & ids[2]) and not (ids[0] & ids[1])
    s = a.train.samples[0]
    k = int(s.id[-7:-4]) % len(SCENES)
    np.testing.assert_allclose(s.orig_boxes, [r[1:] for r in SCENES[k]])
    seg = load_dense_data(f"pennfudan:{root}", "segment", img_size=32)
    assert seg.class_names == ["background", "person"] and set(np.unique(seg.train.samples[0].orig_mask)) == {0, 1}
    (root / "masks" / "P003_mask.png").unlink()
    with pytest.raises(DataError, match="P003_mask.png"):
        load_dense_data(f"pennfudan:{root}", "detect", img_size=32)


def test_real_camvid_if_present():
    root = shared_path("data", "camvid")
    d = load_dense_data(f"camvid:{root}", "segment", img_size=32, max_per_split=20)
    assert d.num_classes == 11 and len(d.train) == 20
    s = d.train.samples[0]
    assert s.orig_mask.shape == (360, 480) and s.orig_mask.max() in (*range(11), IGNORE)


def test_real_pennfudan_if_present():
    root = shared_path("data", "pennfudan")
    d = load_dense_data(f"pennfudan:{root}", "detect", img_size=32)
    splits = (d.train, d.val, d.test)
    assert sum(len(s) for s in splits) == 170
    assert sum(len(x.labels) for s in splits for x in s.samples) == 423


def test_real_bccd_if_present():
    root = shared_path("data", "bccd")
    d = load_dense_data(f"voc:{root}", "detect", img_size=32, max_per_split=8)
    assert d.class_names == ["Platelets", "RBC", "WBC"]
    assert d.info["dropped_zero_area_boxes"] == 2


# ------------------------------------------------------------------------------ training


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_overfit_segmentation_on_four_images(tmp_path):
    root = make_camvid(tmp_path / "cv")
    cfg = tiny_cfg(tmp_path, f"camvid:{root}", epochs=25, lr=3e-2)
    m = train(dataclasses.replace(cfg, task="segment"))
    log = _log(Path(cfg.out))
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    assert log[-1]["val_miou"] > log[0]["val_miou"] + 0.2
    assert m["test_miou"] > 0.6 and len(m["test_per_class_iou"]) == 3
    for key in ("tuned_params", "head_params", "train_seconds", "train_img_per_s", "peak_memory_mb",
                "num_train", "num_test"):
        assert key in m
    assert m["tuned_params"] == 0 and m["head_params"] > 0 and m["num_train"] == 4


def test_overfit_detection_on_four_images(tmp_path):
    root = make_voc(tmp_path / "voc")
    cfg = tiny_cfg(tmp_path, f"voc:{root}", epochs=40, lr=1e-2)
    m = train(dataclasses.replace(cfg, task="detect"))
    log = _log(Path(cfg.out))
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    assert log[-1]["val_map50"] > log[0]["val_map50"] + 0.3
    assert m["test_map50"] > 0.5 and "test_map" in m


# every method the registry can build, on a ViT and a CNN, for both tasks: gradients reach the
# method's modules and the head, and the files rebuild the same predictions.
METHODS_VIT = ["linear", "vpt", "lora", "adapter", "protuning", "full"]
METHODS_CNN = ["linear", "protuning", "full"]
CASES = [("test_vit", m) for m in METHODS_VIT] + [("test_efficientnet", m) for m in METHODS_CNN]


@pytest.mark.parametrize("arch,method", CASES)
def test_every_method_trains_and_round_trips(arch, method, tmp_path):
    opts = {"length": 4} if method == "vpt" else {}
    for task in ("segment", "detect"):
        tuned = attach(seeded_backbone(arch, None, 64), method, **opts)
        model = build_dense_model(tuned, task, 2)
        model.train()
        x = torch.randn(2, 3, 64, 64)
        targets = ([{"mask": torch.randint(0, 2, (64, 64))} for _ in range(2)] if task == "segment" else
                   [{"boxes": torch.tensor([[8.0, 8, 40, 40]]), "labels": torch.tensor([1])} for _ in range(2)])
        model.head.loss(model(x), targets).backward()
        method_params = model.method_parameters()
        if method != "linear":
            assert method_params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in method_params)
        assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
        assert not any(p.requires_grad for p in tuned.model.parameters()
                       if id(p) not in {id(q) for q in method_params})
        with torch.no_grad():  # move the method off its identity init so the round trip means something
            for p in method_params:
                p.add_(0.01 * torch.randn_like(p))
        model.eval()
        save_dense(model, tmp_path / task, extra={"class_names": ["a", "b"]})
        loaded, meta = load_dense(tmp_path / task)
        y = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            a, b = model(y), loaded(y)
        if task == "segment":
            torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(a["cls"], b["cls"])
            torch.testing.assert_close(a["box"], b["box"])
        assert meta["task"] == task and meta["method"]["name"] == method


@pytest.mark.parametrize("arch,task", [("test_vit", "segment"), ("test_efficientnet", "detect")])
def test_spt_scores_come_from_the_dense_loss(arch, task, tmp_path):
    pytest.importorskip("vistune.methods.spt", reason="SPT is not in this checkout")
    from vistune.sensitivity import read_scores

    data = f"camvid:{make_camvid(tmp_path / 'cv')}" if task == "segment" else f"voc:{make_voc(tmp_path / 'voc')}"
    cfg = tiny_cfg(tmp_path, data, method="spt", backbone=arch, options={"budget": "4k"}, epochs=1)
    m = train(dataclasses.replace(cfg, task=task))
    meta, scores = read_scores(Path(cfg.out) / "sensitivity.safetensors")
    assert meta["loss"] == f"dense-{task}" and any(v.abs().sum() > 0 for v in scores.values())
    assert 0 < m["tuned_params"] <= 4000 * 1.5
    loaded, _ = load_dense(cfg.out)
    assert loaded.tuned.spec.name == "spt"


def test_head_gets_its_own_learning_rate():
    from vistune.engine.optim import build_optimizer

    tuned = attach(seeded_backbone("test_vit", None, 64), "lora")
    model = build_dense_model(tuned, "segment", 2)
    opt = build_optimizer(model.method_parameters(), "adamw", 1e-4, 0.05, head=model.head.parameters(), head_lr=1e-2)
    head_ids = {id(p) for p in model.head.parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == (1e-2 if in_head.pop() else 1e-4)
        assert group["weight_decay"] == (0.0 if group["params"][0].ndim <= 1 else 0.05)
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.trainable_parameters())


def test_missing_run_files_are_clear_errors(tmp_path):
    from vistune.errors import TunedFileError

    with pytest.raises(TunedFileError, match="tuned.safetensors is missing"):
        load_dense(tmp_path)


def test_run_files_eval_and_predict(tmp_path):
    root = make_pennfudan(tmp_path / "pf", n=8)
    cfg = tiny_cfg(tmp_path, f"pennfudan:{root}", method="protuning", epochs=2, augment="flip")
    m = train(dataclasses.replace(cfg, task="detect"))
    run = Path(cfg.out)
    assert is_dense_run(run) and is_dense_run(run / "tuned.safetensors") and not is_dense_run(tmp_path)
    for name in ("tuned.safetensors", "dense_head.safetensors", "metrics.json", "splits.json", "log.jsonl"):
        assert (run / name).is_file()
    splits = json.loads((run / "splits.json").read_text())
    assert splits["kind"] == "pennfudan" and splits["splits"]["test"]["size"] == m["num_test"]
    again = evaluate_run(str(run))
    assert again["test_map50"] == pytest.approx(m["test_map50"]) and again["test_map"] == pytest.approx(m["test_map"])
    assert m["tuned_params"] > 0
    out = predict(run, root / "images" / "P000.jpg", tmp_path / "pic.png", score_threshold=0.0)
    with Image.open(tmp_path / "pic.png") as im:
        assert im.size == (W, H)
    assert out["task"] == "detect" and all(0 <= d["box"][2] <= W for d in out["detections"])
    seg_cfg = tiny_cfg(tmp_path, f"pennfudan:{root}", epochs=1, out=str(tmp_path / "seg"))
    train(dataclasses.replace(seg_cfg, task="segment"))
    out = predict(tmp_path / "seg" / "tuned.safetensors", root / "images" / "P001.jpg", tmp_path / "seg.png")
    assert abs(sum(out["class_fraction"].values()) - 1) < 1e-6
    with Image.open(tmp_path / "seg.png") as im:
        assert im.size == (W, H)
