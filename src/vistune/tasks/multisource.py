"""Multi-source pre-training of a method's modules (PVP stage 1): shared modules, a head per source.

The modules are shared by every source; each source has its own linear head (source 0's is the
timm classifier, so the module file keeps the spine's format) and its batches are interleaved
round-robin, one batch per source in turn, until every source is exhausted. ``--shots K``
samples K images per class from each source; ``--source-test`` also trains on each source's
test split (a source is never a target, and Tiny-ImageNet keeps most of its images there). The "val" metric is the mean top-1 over sources,
each on its val split (its test split when it has none: a source is never a target).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.backbones import classifier
from vistune.config import ConfigError, TrainConfig
from vistune.data import DataSplits
from vistune.methods import get_method, method_names
from vistune.tasks.base import Batches, Runtime, Task, TaskProbe, seed_everything
from vistune.tasks.classify import (
    SENSITIVITY_BATCH,
    classification_metrics,
    image_hashes,
    load_classification_data,
)
from vistune.tuning import load_tensors

MODULES_FILE = "modules.safetensors"
HEADS_FILE = "heads.safetensors"


class MultiSourceTask(Task):
    name = "multisource"
    primary = "top1"
    files = (MODULES_FILE, HEADS_FILE)

    def __init__(self, sources: list[str], train_on_test: bool = False) -> None:
        if not sources:
            raise ConfigError("pretrain needs at least one --data source")
        self.sources = list(sources)
        self.train_on_test = train_on_test

    def setup(self, cfg: TrainConfig, rt: Runtime, out: Path | None) -> None:
        if not cfg.method or not get_method(cfg.method).pretrainable:
            able = [n for n in method_names() if get_method(n).pretrainable]
            raise ConfigError(f"pretrain needs a method with modules to transfer; {cfg.method!r} has none "
                              f"(use {', '.join(able)})")
        if cfg.init_from:
            raise ConfigError("pretrain trains modules from their own initialisation; --init-from is for stage 2")
        self.cfg, self.rt = cfg, rt
        seed_everything(cfg.seed)
        backbone = self.build_backbone(cfg)
        self.datas: list[DataSplits] = [load_classification_data(cfg, backbone, s) for s in self.sources]
        if self.train_on_test:  # a source is never a target: its test images may train the modules too
            for d in self.datas:
                if d.test is not None:
                    d.train, d.test = d.train + d.test, None
        first = self.datas[0]
        probe = TaskProbe(self.sensitivity_losses, self.scores_path(cfg, out), self.sources[0], SENSITIVITY_BATCH,
                          "cross-entropy")
        self.tuned = self.place(self.attach_method(cfg, backbone, first.num_classes, probe,
                                                   reseed=lambda: seed_everything(cfg.seed)))
        width = int(self.tuned.model.num_features)
        self.extra_heads = nn.ModuleList(nn.Linear(width, d.num_classes) for d in self.datas[1:]).to(rt.device)
        self.heads: list[nn.Module] = [classifier(self.tuned.model), *self.extra_heads]

    def sensitivity_losses(self, model: nn.Module, num_batches: int) -> Iterator[torch.Tensor]:
        d = self.datas[0]
        head = nn.Linear(int(model.num_features), d.num_classes).to(self.rt.device)
        loader = torch.utils.data.DataLoader(d.train, batch_size=SENSITIVITY_BATCH, shuffle=False)
        for i, (x, y) in enumerate(loader):
            if i >= num_batches:
                break
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            yield nn.functional.cross_entropy(head(model.forward_head(model.forward_features(x), pre_logits=True)), y)

    # -- training ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.tuned, self.extra_heads]

    def parameters(self) -> list[tuple[nn.Parameter, bool]]:
        head = {id(p) for p in self.tuned.head_parameters()}
        own = [(p, id(p) in head) for p in self.tuned.parameters() if p.requires_grad]
        return own + [(p, True) for p in self.extra_heads.parameters()]

    def _loaders(self, epoch: int) -> list[Batches]:
        return [self.rt.train_loader(d.train, self.cfg.batch_size, seed=self.cfg.seed * 100_003 + epoch * 31 + i,
                                     num_workers=self.cfg.num_workers) for i, d in enumerate(self.datas)]

    def num_train_batches(self) -> int:
        return sum(len(loader) for loader in self._loaders(0))  # a streamed (wds:) source's count is its loader's

    def train_batches(self, epoch: int) -> Iterator[tuple[Any, int]]:
        iters = [iter(loader) for loader in self._loaders(epoch)]
        active = list(range(len(iters)))
        while active:
            for i in list(active):
                item = next(iters[i], None)
                if item is None:
                    active.remove(i)
                    continue
                batch, n_global = item
                yield (None if batch is None else (i, batch)), n_global

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        i, (x, y) = batch
        x, y = x.to(self.rt.device), y.to(self.rt.device)
        with self.amp():
            logits = self.heads[i](self.tuned.forward_features(x))
        loss = nn.functional.cross_entropy(logits.float(), y)
        return loss, len(y), {"correct": float((logits.argmax(1) == y).sum().item())}

    def train_fields(self, stats: dict[str, float], seen: int) -> dict[str, Any]:
        return {"train_top1": 100.0 * stats.get("correct", 0.0) / max(seen, 1)}

    # -- evaluation --------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return split == "val"

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        self.tuned.eval()
        per_source = []
        for i, (spec, d) in enumerate(zip(self.sources, self.datas)):
            dataset = d.val if d.val is not None else d.test
            if dataset is None:
                per_source.append({"data": spec, "eval_split": None, "eval_top1": None})
                continue
            k = d.num_classes
            correct, total, loss_sum = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long), 0.0
            for x, y in self.rt.eval_loader(dataset, self.cfg.batch_size):
                x, y = x.to(self.rt.device), y.to(self.rt.device)
                with self.amp():
                    logits = self.heads[i](self.tuned.forward_features(x)).float()
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                hit = (logits.argmax(1) == y).cpu()
                total += torch.bincount(y.cpu(), minlength=k)
                correct += torch.bincount(y.cpu()[hit], minlength=k)
            res = classification_metrics(self.rt.gather((correct, total, loss_sum)))
            per_source.append({"data": spec, "eval_split": "val" if d.val is not None else "test",
                               "eval_top1": res["top1"], "eval_loss": res["loss"]})
        scored = [s["eval_top1"] for s in per_source if s["eval_top1"] is not None]
        return {"top1": sum(scored) / len(scored) if scored else 0.0, "sources": per_source}

    def metric_fields(self, prefix: str, result: dict[str, Any], final: bool) -> dict[str, Any]:
        if not final:
            return {f"{prefix}_top1": result["top1"]}
        self._summary = [{**s, "num_train": len(d.train), "num_classes": d.num_classes,
                          "class_names": list(d.class_names)} for s, d in zip(result["sources"], self.datas)]
        return {f"{prefix}_top1": result["top1"], "sources": self._summary}

    # -- state and outputs --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.tuned.tuned_state_dict())
        state.update({f"extra_heads.{k}": v for k, v in self.extra_heads.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], what: str) -> None:
        load_tensors(self.tuned, {k: v for k, v in state.items() if not k.startswith("extra_heads.")}, what)
        self.extra_heads.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("extra_heads.")})

    def describe(self) -> dict[str, Any]:
        report = self.tuned.parameter_report()
        return {
            "backbone": report["backbone"], "method": report["method"], "options": report["options"],
            "tuned_params": report["tuned_params"], "head_params": report["head_params"],
            "backbone_params": report["backbone_params"], "tuned_percent": report["tuned_percent"],
            "num_train": sum(len(d.train) for d in self.datas), "modules_file": MODULES_FILE,
        }  # fmt: skip

    def output_files(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[Path], None]]]:
        hashes = sorted({h for d in self.datas for part in (d.train, d.val) if part is not None
                         for h in image_hashes(part)})
        meta = {**extra, "pretrain": {"sources": getattr(self, "_summary", []), "source_image_hashes": hashes}}
        head_tensors = {f"source{i}.{k}": v.detach().cpu().contiguous() for i, h in enumerate(self.heads)
                        for k, v in h.state_dict().items()}

        def write_heads(tmp: Path) -> None:
            from safetensors.torch import save_file

            save_file(head_tensors, str(tmp), metadata={"sources": json.dumps(self.sources)})

        return [(MODULES_FILE, lambda tmp: self.tuned.write_tuned(tmp, extra=meta)), (HEADS_FILE, write_heads)]
