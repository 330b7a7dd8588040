"""Dense kinds in the one data system: registry, parser, task check, refusals, workers, CLI.

What a dense spec yields is pinned by ``test_dense_yield.py``; here: that ``camvid``/``voc``/
``pennfudan`` are ordinary entries of :data:`vistune.data.READERS` (declaring the tasks they
feed), that a spec for the wrong task or an option dense data cannot honour fails with one
line instead of being ignored, and that the decode threads do not change what is decoded.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_dense import make_camvid, make_pennfudan, make_voc, tiny_cfg
from vistune.backbones import seeded_backbone
from vistune.data import KNOWN_KINDS, READERS, DataError, load_data, parse_spec
from vistune.data.__main__ import main as data_main
from vistune.dense import load_dense_data
from vistune.tasks.dense import load_dense_for


def test_dense_kinds_are_registry_entries_that_declare_their_tasks():
    assert READERS["camvid"].tasks == ("segment",)
    assert READERS["voc"].tasks == ("detect",)
    assert READERS["pennfudan"].tasks == ("segment", "detect")
    assert {k for k, r in READERS.items() if r.tasks == ("classify",)} == {
        "fashion-mnist", "npz", "folder", "vtab", "fgvc", "hf", "tv", "wds"}
    assert parse_spec("CamVid: /a/b:c") == ("camvid", "/a/b:c")  # the one parser's rules apply


def test_unknown_kind_from_a_dense_load_names_every_kind(tmp_path):
    with pytest.raises(DataError, match="unknown data spec kind 'coco'") as err:
        load_dense_data(f"coco:{tmp_path}", "segment", img_size=32)
    for kind in KNOWN_KINDS:
        assert f"{kind}" in str(err.value)
    with pytest.raises(DataError, match="needs a path: camvid:DIR"):
        load_dense_data("camvid:", "segment", img_size=32)


def test_a_kind_used_for_the_wrong_task_says_what_it_serves(tmp_path):
    camvid = make_camvid(tmp_path / "cv")
    with pytest.raises(DataError, match=r"camvid: data serves segment, not 'classify'"):
        load_data(f"camvid:{camvid}", img_size=16)
    with pytest.raises(DataError, match=r"camvid: data serves segment, not 'detect'"):
        load_dense_data(f"camvid:{camvid}", "detect", img_size=32)
    with pytest.raises(DataError, match=r"folder: data serves classify, not 'segment'"):
        load_dense_data(f"folder:{camvid}", "segment", img_size=32)


@pytest.mark.parametrize("option,value", [("subset", (2, 1)), ("shots", 1), ("imbalance", 10.0)])
def test_classification_only_options_are_refused_not_ignored(tmp_path, option, value):
    root = make_voc(tmp_path / "voc")
    with pytest.raises(DataError, match=f"^{option} is for classification data only, not task 'detect'"):
        load_dense_data(f"voc:{root}", "detect", img_size=32, **{option: value})


def test_subset_refused_for_a_dense_run_but_not_when_reopening_one(tmp_path):
    """Runs written before the refusal recorded ``subset`` without using it; they must reload."""
    root = make_camvid(tmp_path / "cv")
    cfg = tiny_cfg(tmp_path, f"camvid:{root}", task="segment", subset="2/1")
    backbone = seeded_backbone("test_vit", None, 64)
    with pytest.raises(DataError, match="subset is for classification data only"):
        load_dense_for(cfg, "segment", backbone)
    data = load_dense_for(cfg, "segment", backbone, training=False)
    assert len(data.train) == 4 and len(data.val) == 4


def test_missing_folder_and_layout_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"pennfudan: data folder {tmp_path / 'nope'} does not exist"):
        load_dense_data(f"pennfudan:{tmp_path / 'nope'}", "detect", img_size=32)
    with pytest.raises(DataError, match=f"voc: {tmp_path} needs JPEGImages/ and Annotations/"):
        load_dense_data(f"voc:{tmp_path}", "detect", img_size=32)


def test_decode_threads_do_not_change_what_is_decoded(tmp_path):
    root = make_pennfudan(tmp_path / "pf", n=12)
    one = load_dense_data(f"pennfudan:{root}", "segment", img_size=24, workers=1)
    three = load_dense_data(f"pennfudan:{root}", "segment", img_size=24, workers=3)
    for split in ("train", "val", "test"):
        a, b = getattr(one, split), getattr(three, split)
        assert a.ids == b.ids
        for x, y in zip(a.samples, b.samples):
            assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)


def test_trainval_and_cap_are_recorded_like_classification(tmp_path):
    root = make_camvid(tmp_path / "cv")
    d = load_dense_data(f"camvid:{root}", "segment", img_size=32, trainval=True, max_per_split=3)
    capped = load_dense_data(f"camvid:{root}", "segment", img_size=32, max_per_split=3)
    # each split capped first (the same seeded draw), then val appended to train in order
    assert d.val is None and d.train.ids == capped.train.ids + capped.val.ids and len(d.train) == 6
    assert d.test.ids == capped.test.ids
    m = d.manifest()
    assert m["trainval"] is True and m["max_per_split"] == 3
    assert "trainval: val merged into train, no val split" in m["notes"]
    assert m["splits"]["val"] is None and m["splits"]["train"]["ids"] == d.train.ids


def test_fetch_command_summarises_a_dense_spec(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    assert data_main(["fetch", f"voc:{root}"]) == 0
    assert "4 train, 4 val, 4 test images, 2 classes" in capsys.readouterr().out
    assert data_main(["shard", f"voc:{root}", "--out", str(tmp_path / "s"), "--shard-size", "2"]) == 2
    assert "voc: data serves detect, not 'classify'" in capsys.readouterr().err
