"""Fuzz-style walk over every ``vistune`` sub-command with bad values (issue 14).

Each case must end in exit code 2 and exactly one line on stderr, never a traceback: that is the
CLI's promise for anything a user can type. Cases run in-process (``vistune.cli.main``) for speed;
a few run as real processes, which also proves nothing escapes argparse, logging or warnings.

Adding a sub-command: add one line per bad value to ``CASES``. ``test_every_sub_command_is_fuzzed``
fails until a new sub-command has at least one case.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_dense import make_camvid
from tests.test_engine import make_folder
from vistune.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

#: A classification run's common flags (tiny ViT, tiny folder, one epoch).
T = "--backbone test_vit --img-size 32 --data folder:{data} --epochs 1 --batch-size 8 --no-progress"
#: (sub-command, argv template). Placeholders: {data} image folder, {cv} CamVid-style folder,
#: {run}/{drun} a finished classification/segmentation run, {image} a photo, {notimage}, {text}
#: and {garbage} files that are no image/weights/config, {afile} a plain file, {dup_yaml} and
#: {bad_yaml} broken configs, {nan_metrics} a run folder whose metrics.json holds NaN, {bad_sweep}
#: a sweep folder whose sweep.json is no result, {busy_port} a port already listened on, {tmp} a
#: fresh folder per case.
CASES: list[tuple[str, str]] = [
    ("", ""),
    ("", "nope"),
    ("info", "info --backbone nope --method lora"),
    ("info", "info --backbone test_vit --method nope"),
    ("info", "info --backbone test_vit --method lora -o rank=0"),
    ("info", "info --backbone test_vit --method lora -o rank=many"),
    ("info", "info --backbone test_vit --method lora -o nope=1"),
    ("info", "info --backbone test_vit --method lora -o alpha=nan"),
    ("info", "info --backbone test_vit --method lora --img-size 30"),
    ("info", "info --backbone test_vit --method lora --img-size 8"),
    ("info", "info --backbone test_vit --method lora --img-size -5"),
    ("info", "info --backbone test_convnext --method linear --img-size 16"),
    ("info", "info --backbone test_vit --method lora --num-classes -1"),
    ("info", "info --backbone test_vit --method lora --weights {text}"),
    ("info", "info --backbone test_vit --method lora --weights {garbage}"),
    ("info", "info --backbone test_vit --method lora --weights {run}/tuned.safetensors"),
    ("info", "info --backbone test_vit --method lora --weights {run}/checkpoint.pt"),
    ("info", "info --backbone test_vit --method lora --weights {tmp}/absent.pt"),
    ("info", "info --backbone test_vit --method lora --weights resnet20-cifar"),
    ("info", "info --backbone test_vit --method lora --json --bogus"),
    ("weights", "weights"),
    ("weights", "weights get nope"),
    ("weights", "weights get resnet20-cifar --cache-dir {afile}"),
    ("weights", "weights list --cache-dir {afile}"),
    ("train", "train"),
    ("train", "train --backbone test_vit --method linear --out {tmp}/o"),
    ("train", "train " + T + " --method linear --out {tmp}/o --img-size 30"),
    ("train", "train " + T + " --method linear --out {tmp}/o --epochs 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --epochs -1"),
    ("train", "train " + T + " --method linear --out {tmp}/o --batch-size 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --batch-size -8"),
    ("train", "train " + T + " --method linear --out {tmp}/o --shots 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --lr nan"),
    ("train", "train " + T + " --method linear --out {tmp}/o --lr -1"),
    ("train", "train " + T + " --method linear --out {tmp}/o --lr abc"),
    ("train", "train " + T + " --method linear --out {tmp}/o --clip-grad -1"),
    ("train", "train " + T + " --method linear --out {tmp}/o --wd -1"),
    ("train", "train " + T + " --method linear --out {tmp}/o --warmup-epochs -1"),
    ("train", "train " + T + " --method linear --out {tmp}/o --accum-steps 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --max-per-split 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --optimizer rmsprop"),
    ("train", "train " + T + " --method linear --out {tmp}/o --log wandb"),
    ("train", "train " + T + " --method linear --out {tmp}/o --log mlflow --mlflow-uri http://127.0.0.1:9"),
    ("train", "train " + T + " --method linear --out {tmp}/o --log mlflow --mlflow-uri file:{afile}"),
    ("train", "train " + T + " --method linear --out {tmp}/o --log tensorboard --log-dir {afile}"),
    ("train", "train " + T + " --method linear --out {tmp}/o --mlflow-uri file:{tmp}/ml"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/o --log mlflow --mlflow-uri http://127.0.0.1:9"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --log mlflow --mlflow-uri http://127.0.0.1:9"),
    ("pretrain", "pretrain " + T + " --method vpt --out {tmp}/o --log tensorboard --log-dir {afile}"),
    ("train", "train " + T + " --method linear --out {tmp}/o --imbalance 0.5"),
    ("train", "train " + T + " --method linear --out {tmp}/o --imbalance 0"),
    ("train", "train " + T + " --method linear --out {tmp}/o --imbalance abc"),
    ("train", "train " + T + " --method linear --out {tmp}/o --imbalance nan"),
    ("train", "train " + T + " --method linear --out {tmp}/o --imbalance 100"),
    ("train", "train " + T + " --method linear --out {tmp}/o --group-thresholds 20,100"),
    ("train", "train " + T + " --method linear --out {tmp}/o --group-thresholds many"),
    ("train", "train " + T + " --method linear --out {tmp}/o --task segment --imbalance 2"),
    ("train", "train " + T + " --method linear --out {tmp}/o --device banana"),
    ("train", "train " + T + " --method linear --out {tmp}/o --device cuda:99"),
    ("train", "train " + T + " --method linear --out {tmp}/o --device meta"),
    ("train", "train " + T + " --method linear --out {tmp}/o --nproc 0"),
    ("train", "train " + T + " --method nope --out {tmp}/o"),
    ("train", "train " + T + " --method lora -o alpha=nan --out {tmp}/o"),
    ("train", "train " + T + " --method linear --config {dup_yaml} --out {tmp}/o"),
    ("train", "train " + T + " --method linear --config {bad_yaml} --out {tmp}/o"),
    ("train", "train " + T + " --method linear --config {tmp}/absent.yaml --out {tmp}/o"),
    ("train", "train " + T + " --method linear --weights {text} --out {tmp}/o"),
    ("train", "train " + T + " --method linear --weights {run}/tuned.safetensors --out {tmp}/o"),
    ("train", "train " + T + " --method lora --init-from {text} --out {tmp}/o"),
    ("train", "train " + T + " --method spt --sensitivity {text} --out {tmp}/o"),
    ("train", "train " + T + " --method linear --resume --out {tmp}/o"),
    ("train", "train " + T + " --method linear --out {afile}"),
    ("train", "train " + T + " --method linear --out {afile}/sub"),
    ("train", "train " + T + " --method linear --out {run}"),
    ("train", "train " + T + " --method linear --out ''"),
    ("train", "train " + T + " --method linear --data folder:{tmp}/absent --out {tmp}/o"),
    ("train", "train " + T + " --method linear --data nope:x --out {tmp}/o"),
    ("train", "train " + T + " --method linear --task detect --out {tmp}/o"),
    ("sensitivity", "sensitivity " + T + " --scores {afile}/s.safetensors --batches 1"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --budget abc"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --batches 0"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --sens-batch-size 0"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --rank 0"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --alpha nan"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --plot {tmp}/p.png"),
    ("sensitivity", "sensitivity " + T + " --scores {tmp}/s.safetensors --device banana"),
    ("sensitivity", "sensitivity " + T + " --scores {text} --budget 5k"),
    ("predict", "predict --tuned {drun} --image {notimage} --out {tmp}/p.png"),
    ("predict", "predict --tuned {drun} --image {tmp}/absent.png --out {tmp}/p.png"),
    ("predict", "predict --tuned {drun} --image {tmp} --out {tmp}/p.png"),
    ("predict", "predict --tuned {drun} --image {image} --out {afile}/p.png"),
    ("predict", "predict --tuned {drun} --image {image} --out {tmp}/p.png --device banana"),
    ("predict", "predict --tuned {drun} --image {image} --out {tmp}/p.png --score-threshold nan"),
    ("predict", "predict --tuned {run} --image {image} --out {tmp}/p.png"),
    ("predict", "predict --tuned {text} --image {image} --out {tmp}/p.png"),
    ("predict", "predict --tuned {drun} --image {image}"),
    ("pretrain", "pretrain " + T + " --method vpt --out {tmp}/o --epochs 0"),
    ("pretrain", "pretrain --backbone test_vit --method vpt --out {tmp}/o --no-progress"),
    ("pretrain", "pretrain " + T + " --method vpt --out {tmp}/o --device banana"),
    ("pretrain", "pretrain " + T + " --method vpt --out {tmp}/o --nproc 0"),
    ("pretrain", "pretrain " + T + " --method vpt --out {afile}"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --shots 0"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --shots a,b"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --seeds 0"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --seed-list x"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --compare linear,nope"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --compare lora+pvp"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --pvp lora"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --lr-for linear=abc"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --lr-for linear=nan"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --device banana"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --imbalance 0.99"),
    ("fewshot", "fewshot " + T + " --method linear --out {tmp}/o --shots 1,2 --imbalance 10"),
    ("eval", "eval --tuned {tmp}/absent"),
    ("eval", "eval --tuned {text}"),
    ("eval", "eval --tuned {truncated}"),
    ("eval", "eval --tuned {run} --batch-size 0"),
    ("eval", "eval --tuned {run} --device banana"),
    ("eval", "eval --tuned {run} --device cuda:99"),
    ("eval", "eval --tuned {run} --data folder:{tmp}/absent"),
    ("eval", "eval --tuned {run} --data camvid:{cv}"),
    ("eval", "eval --tuned {run} --weights {text}"),
    ("eval", "eval --tuned {run} --split nope"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --sampler tpe"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --sampler tpe --trials 0"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --max-trials 0"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --seeds 0"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --jobs 0"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --grid lr"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --grid lr=nan"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --grid nope=1,2"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --device banana"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --imbalance -2"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --imbalance x"),
    ("sweep", "sweep " + T + " --method linear --out {tmp}/s --img-size 30"),
    ("sweep", "sweep " + T + " --method linear --out {afile}"),
    ("sweep", "sweep " + T + " --method linear --data folder:{tmp}/absent --out {tmp}/s"),
    ("sweep", "sweep " + T + " --method linear --weights {text} --out {tmp}/s"),
    ("sweep", "sweep " + T + " --method linear --out {bad_journal}"),
    ("export", "export --tuned {run} --format nope --out {tmp}/x"),
    ("export", "export --tuned {tmp}/absent --format timm --out {tmp}/x"),
    ("export", "export --tuned {text} --format timm --out {tmp}/x"),
    ("export", "export --tuned {run} --format timm --out {afile}"),
    ("export", "export --tuned {run} --format timm --out {run}"),
    ("export", "export --tuned {run} --format onnx --exporter nope --out {tmp}/x"),
    ("export", "export --tuned {run} --format peft --out {tmp}/x"),
    ("export", "export --tuned {run} --format timm --out {tmp}/x --weights {text}"),
    ("export", "export --tuned {run}"),
    ("export", "export --tuned {runcopy} --format timm --out {runcopy} --overwrite"),
    ("export", "export --tuned {runcopy}/tuned.safetensors --format onnx --out {runs_parent} --overwrite"),
    ("import-peft", "import-peft {tmp}/absent --backbone test_vit --out {tmp}/t.safetensors"),
    ("import-peft", "import-peft {run} --backbone test_vit --out {tmp}/t.safetensors"),
    ("import-peft", "import-peft {tmp} --backbone test_vit"),
    ("import-peft", "import-peft {peft_list} --backbone test_vit --img-size 32 --out {tmp}/t.safetensors"),
    ("import-peft", "import-peft {peft_r64} --backbone test_vit --img-size 32 --out {tmp}/t.safetensors"),
    ("import-peft", "import-peft {peft_rx} --backbone test_vit --img-size 32 --out {tmp}/t.safetensors"),
    ("import-peft", "import-peft {peft_r0} --backbone test_vit --img-size 32 --out {tmp}/t.safetensors"),
    ("serve", "serve"),
    ("serve", "serve --task nope"),
    ("serve", "serve --task a={tmp}/absent"),
    ("serve", "serve --task a={text}"),
    ("serve", "serve --task a={run} --task a={run}"),
    ("serve", "serve --task a={run} --port 70000"),
    ("serve", "serve --task a={run} --max-batch 0"),
    ("serve", "serve --task a={run} --batch-window-ms nan"),
    ("serve", "serve --task a={run} --device banana"),
    ("serve", "serve --task a={run} --backbone nope"),
    ("serve", "serve --task a={run} --port {busy_port}"),
    ("serve", "serve --config {bad_yaml}"),
    ("serve", "serve --config {token_yaml}"),
    ("serve", "serve --task a={run} --admin-token abcdefghijklmnopqrstuvwxyz"),
    ("serve", "serve --task a={run} --admin --admin-token abcdefghijklmnopqrstuvwxyz"),
    ("serve", "serve --task a={run} --admin --task-root {tmp}"),
    ("serve", "serve --task a={run} --admin --task-root {tmp} --admin-token short"),
    ("serve", "serve --task a={run} --admin --task-root {tmp}/absent --admin-token abcdefghijklmnopqrstuvwxyz"),
    ("serve", "serve --task a={run} --admin --task-root {afile} --admin-token abcdefghijklmnopqrstuvwxyz"),
    ("serve", "serve --task a={run} --admin --read-only --task-root {tmp} --admin-token abcdefghijklmnopqrstuvwxyz"),
    ("serve", "serve --task a={run} --task-root {tmp}"),
    ("serve", "serve --task a={run} --max-inflight 0"),
    ("serve", "serve --task a={run} --max-decodes 0"),
    ("serve", "serve --task a={run} --max-image-mb nan"),
    ("serve", "serve --task a={run} --max-image-mb -1"),
    ("report", "report"),
    ("report", "report {tmp}/absent"),
    ("report", "report {nan_metrics}"),
    ("report", "report {text}"),
    ("report", "report {bad_sweep}"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions nope"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog,nope"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --severities 0"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --severities 6"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --severities x"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack nope"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack fgsm --eps 0"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack fgsm --eps 1.5"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack fgsm --eps=-8/255"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack fgsm --eps abc"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack pgd --pgd-steps 0"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack pgd --pgd-alpha nan"),
    ("robustness", "robustness --tuned {drun} --out {tmp}/r --attack fgsm"),
    ("robustness", "robustness --tuned {drun} --out {tmp}/r --corruptions fog"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --ood folder:{data} --class-map {bad_map}"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --ood folder:{data} --class-map {text}"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --ood folder:{data} --class-map {tmp}/absent.yaml"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --ood folder:{tmp}/absent"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --class-map {bad_map}"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --max-images 0"),
    ("robustness", "robustness --tuned {run} --out {afile} --corruptions fog"),
    ("robustness", "robustness --tuned {run} --out {afile}/sub --corruptions fog"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --device banana"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --data camvid:{cv}"),
    ("robustness", "robustness --tuned {text} --out {tmp}/r --corruptions fog"),
    ("robustness", "robustness --tuned {tmp}/absent --out {tmp}/r --corruptions fog"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --corruptions fog --baseline {text}"),
    ("robustness", "robustness --tuned {run} --out {tmp}/r --attack fgsm --baseline {run}"),
    ("report", "report {tmp}"),
    ("report", "report {tmp}/absent {text}"),
    ("report", "report {unfinished} {tmp}/typo"),
]

#: Cases also run as a real ``python -m vistune`` process (argparse, timm's logging, warnings).
SUBPROCESS = [
    "train " + T + " --method linear --out {tmp}/o --lr abc",
    "info --backbone test_vit --method lora --weights {run}/tuned.safetensors",
    "train " + T + " --method linear --out {tmp}/o --device banana",
    "report {nan_metrics}",
    "robustness --tuned {run} --out {tmp}/r --corruptions fog --severities 6",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, request) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    data = make_folder(root / "data", per_class=3)
    cv = make_camvid(root / "cv")
    run, drun = root / "run", root / "drun"
    base = ["--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--epochs", "1", "--no-progress"]
    assert main(["train", *base, "--data", f"folder:{data}", "--batch-size", "8", "--out", str(run)]) == 0
    assert main(["train", *base, "--task", "segment", "--data", f"camvid:{cv}", "--batch-size", "4",
                 "--out", str(drun)]) == 0
    (root / "notes.txt").write_text("not an image, not weights, not a config\n")
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (root / "afile").write_text("")
    (root / "notimage.png").write_text("not a png")
    (root / "dup.yaml").write_text("lr: 0.01\nlr: 0.1\n")
    (root / "bad.yaml").write_text("lr: [0.1\n")
    (root / "badmap.yaml").write_text("class0: no_such_class\n")  # robustness --class-map
    (root / "token.yaml").write_text("admin: true\nadmin_token: abcdefghijklmnopqrstuvwxyz\n")
    tuned = (run / "tuned.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(tuned[: len(tuned) // 2])
    (root / "nan").mkdir()
    (root / "nan" / "metrics.json").write_text('{"method": "lora", "test_top1": NaN}')
    (root / "sweep").mkdir()
    (root / "sweep" / "sweep.json").write_text("[1, 2]")
    (root / "runs").mkdir()  # a run beside others, for the --overwrite cases (that must never delete it)
    shutil.copytree(run, root / "runs" / "r1")
    (root / "runs" / "r2").mkdir()
    (root / "runs" / "r2" / "keep.txt").write_text("another run's file")
    (root / "unfinished").mkdir()
    (root / "unfinished" / "checkpoint.pt").write_bytes(b"")
    (root / "journal").mkdir()
    (root / "journal" / "study.journal").write_bytes(b'{"op_code": 0}\n' + bytes(range(11, 256)) + b"\n")
    peft = make_peft_adapters(root)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    request.addfinalizer(busy.close)
    return dict(runcopy=str(root / "runs" / "r1"), runs_parent=str(root / "runs"), unfinished=str(root / "unfinished"),
                bad_journal=str(root / "journal"), **peft,
                bad_sweep=str(root / "sweep"), busy_port=str(busy.getsockname()[1]),data=str(data), cv=str(cv), run=str(run), drun=str(drun), image=str(next((cv / "test").glob("*.jpg"))),
                notimage=str(root / "notimage.png"), text=str(root / "notes.txt"), garbage=str(root / "garbage.bin"),
                afile=str(root / "afile"), dup_yaml=str(root / "dup.yaml"), bad_yaml=str(root / "bad.yaml"),
                token_yaml=str(root / "token.yaml"),
                truncated=str(root / "truncated.safetensors"), nan_metrics=str(root / "nan"),
                bad_map=str(root / "badmap.yaml"))


def make_peft_adapters(root: Path) -> dict[str, str]:
    """A small vistune-exported PEFT adapter and copies whose adapter_config.json is wrong."""
    from vistune import attach
    from vistune.backbones import seeded_backbone
    from vistune.export import export

    tuned = attach(seeded_backbone("test_vit", None, 32), "lora", num_classes=3, rank=2)
    tuned.save_tuned(root / "lora" / "tuned.safetensors")
    export(root / "lora", "peft", root / "peft", include_base=False)
    out = {}
    for name, edit in (("peft_list", []), ("peft_r64", {"r": 64}), ("peft_rx", {"r": "x"}), ("peft_r0", {"r": 0})):
        folder = Path(shutil.copytree(root / "peft", root / name))
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **edit} if edit else edit))
        out[name] = str(folder)
    return out


def argv_for(template: str, env: dict[str, str], tmp: Path) -> list[str]:
    values = {k: shlex.quote(v) for k, v in {**env, "tmp": str(tmp)}.items()}
    return shlex.split(template.format(**values))


def check_one_line(rc, err: str, what: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"{what}: exit {rc}, stderr {err!r}"
    assert "Traceback" not in err, f"{what}: {err}"
    assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("vistune") and "error" in lines[0], f"{what}: {lines[0]}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("command,template", CASES, ids=[t or "(empty)" for _, t in CASES])
def test_bad_input_is_one_line_exit_2(env, tmp_path, capsys, monkeypatch, command, template):
    monkeypatch.delenv("VISTUNE_ADMIN_TOKEN", raising=False)  # the serve --admin cases rely on its absence
    argv = argv_for(template, env, tmp_path)
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse
        rc = stop.code
    out, err = capsys.readouterr()
    check_one_line(rc, err, template)
    if command == "robustness":  # refused before anything is written
        assert not (tmp_path / "r").exists(), f"{template}: wrote {tmp_path / 'r'}"


@pytest.mark.parametrize("template", SUBPROCESS)
def test_bad_input_in_a_real_process(env, tmp_path, template):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vistune", *argv_for(template, env, tmp_path)], env=environ,
                          capture_output=True, text=True, timeout=300)
    check_one_line(proc.returncode, proc.stderr, template)


def test_every_sub_command_is_fuzzed():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    covered = {command for command, _ in CASES}
    missing = sorted(set(sub.choices) - covered)
    assert not missing, f"add bad-input cases to CASES for: {missing}"


def test_the_fixture_runs_are_sound(env):
    """The cases above fail because of their bad value, not because the fixtures are broken."""
    m = json.loads((Path(env["run"]) / "metrics.json").read_text())
    assert m["method"] == "linear" and (Path(env["drun"]) / "dense_head.safetensors").is_file()
    assert (Path(env["runs_parent"]) / "r2" / "keep.txt").is_file()  # --overwrite never deleted a sibling run
    assert (Path(env["runcopy"]) / "tuned.safetensors").is_file()  # ... nor the exported run
