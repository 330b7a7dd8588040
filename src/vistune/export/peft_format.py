"""HF PEFT LoRA adapters: write vistune's LoRA in PEFT's layout, and read PEFT adapters back.

**Layout.** A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)``; PEFT adds ``scaling * B(A(x))`` to the module's output with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with ``use_rslora``), ``r``/``alpha`` per module from ``rank_pattern`` /
``alpha_pattern``. ``modules_to_save`` modules (our head) are saved whole as
``base_model.model.head.weight``/``bias`` (PEFT strips its ``modules_to_save.default`` wrapper).

**vistune → PEFT, exactly.** timm fuses q, k and v into one ``attn.qkv`` Linear; vistune's LoRA
on ``q,v`` is two rank-r deltas on its first and last thirds of rows. In PEFT terms that is one
rank-``2r`` LoRA on ``attn.qkv`` with block-structured factors: ``A = [A_q; A_v]`` and ``B``
holding ``B_q`` in the q rows of the first r columns and ``B_v`` in the v rows of the last r
columns (zeros elsewhere), so ``B·A = [B_q A_q; 0; B_v A_v]``. ``alpha`` is set per module so
PEFT's ``alpha / rank`` equals vistune's scale; ``proj``/``fc1``/``fc2`` map one to one.

**PEFT → vistune.** A LoRA on the whole ``attn.qkv`` (``ΔW = s·B·A``) splits by rows into
``s·B_q·A``, ``s·B_k·A``, ``s·B_v·A``: three per-slice LoRAs sharing ``A``, exactly vistune's
``q,k,v`` targets with A copied. Columns of a slice's ``B`` that are all zero contribute nothing
and are dropped, so a block-structured adapter (ours) comes back at its original rank, and a
target whose ``B`` is zero in every block is dropped altogether. vistune's LoRA has one rank
and one scale: slices are zero-padded to the largest rank (exact), and modules with different
PEFT scalings get theirs folded into ``B`` (exact up to float rounding). Blocks an adapter
skips (``layers_to_transform``) get zero deltas. Anything else (DoRA, LoRA biases, trained
biases, embeddings, modules that are not a role's site in the backbone's blocks (anatomy.py), a head shape or
module shape of another architecture) is refused with one line. An adapter that vistune exported
carries ``vistune_export.json``; its backbone fingerprint must match the backbone named on import
(same weights, same image size), and its class names are reused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.anatomy import ROLES, Anatomy, describe
from vistune.backbones import BackboneError, backbone_info, classifier
from vistune.export.run import (
    SIDECAR,
    ExportError,
    Run,
    build_backbone,
    load_run,
    refuse,
    refuse_dense,
    sidecar,
    staged_dir,
    state_for_file,
    write_json,
)
from vistune.export.timm_format import loader_lines, write_timm_folder
from vistune.methods.lora import ConvLoRA, LoRABranch
from vistune.tuning import MethodSpec, attach, fingerprint, load_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_DIR = "base"
PREFIX = "base_model.model."
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

#: PEFT config switches that change the forward in ways vistune's LoRA cannot express.
_UNSUPPORTED_FLAGS = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "layer_replication",
                      "trainable_token_indices", "target_parameters")


def _head_name(model: nn.Module) -> str:
    head = classifier(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ExportError(f"{type(model).__name__}: its classifier is not a named submodule")


def _relative(host: str) -> str:
    """``blocks.3.attn.qkv`` → ``attn.qkv``: the suffix PEFT's target_modules match on."""
    m = _BLOCK.match(host)
    return m.group(2) if m else host


# ------------------------------------------------------------------------------------------------
# vistune -> PEFT


def peft_tensors(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Adapter tensors in PEFT's key layout, the rank of each target suffix, and vistune's scale."""
    model = run.tuned.model
    rank = int(run.tuned.method.options.rank)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scale = None
    for name, branch in model.named_modules():
        if isinstance(branch, ConvLoRA):
            host = name.rsplit(".", 1)[0]
            conv = model.get_submodule(host)
            if type(conv) is not nn.Conv2d:
                raise ExportError(
                    f"{run.path}: {host} is a {type(conv).__name__} (a dynamic 'same' pad before the conv); PEFT's "
                    "Conv2d LoRA would convolve its input unpadded, so it cannot carry this update (use --format timm or onnx)"
                )
            if conv.groups != 1:
                raise ExportError(
                    f"{run.path}: {host} is a grouped convolution (groups={conv.groups}); PEFT's Conv2d LoRA "
                    "is a dense k×k conv to r channels, so it cannot carry this update (use --format timm or onnx)"
                )
            out_ch, in_ch, kh, kw = branch.weight_shape
            tensors[f"{PREFIX}{host}.lora_A.weight"] = branch.A["all"].detach().reshape(rank, in_ch, kh, kw)
            tensors[f"{PREFIX}{host}.lora_B.weight"] = branch.B["all"].detach().reshape(out_ch, rank, 1, 1)
            if ranks.setdefault(_relative(host), rank) != rank:  # pragma: no cover - one rank per run
                raise ExportError(f"{run.path}: {host} has a different rank")
            scale = float(branch.scale)
            continue
        if not isinstance(branch, LoRABranch):
            continue
        host = name.rsplit(".", 1)[0]
        keys = list(branch.slices)  # in row order
        big = rank * len(keys)
        a = torch.cat([branch.A[k].detach() for k in keys], dim=0)
        b = torch.zeros(branch.out_features, big, dtype=a.dtype)
        for j, k in enumerate(keys):
            b[branch.slices[k], j * rank:(j + 1) * rank] = branch.B[k].detach()
        tensors[f"{PREFIX}{host}.lora_A.weight"] = a
        tensors[f"{PREFIX}{host}.lora_B.weight"] = b
        suffix = _relative(host)
        if ranks.setdefault(suffix, big) != big:  # pragma: no cover - vistune targets every block alike
            raise ExportError(f"{run.path}: {suffix} has different ranks in different blocks")
        scale = float(branch.scale)
    if scale is None:
        raise ExportError(f"{run.path}: the lora method holds no LoRA branch")
    head = _head_name(model)
    for k, v in classifier(model).state_dict().items():
        tensors[f"{PREFIX}{head}.{k}"] = v.detach()
    return tensors, ranks, scale


def peft_config(run: Run, ranks: dict[str, int], scale: float) -> dict[str, Any]:
    """An adapter_config.json PEFT reads: ``r``/``lora_alpha`` for the most common rank, patterns
    for the others, alpha = scale x rank so that PEFT's alpha / r is vistune's scale."""
    opts = run.tuned.method.options
    r = max(set(ranks.values()), key=lambda v: (list(ranks.values()).count(v), v))
    rank_pattern = {k: v for k, v in ranks.items() if v != r}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": run.backbone["arch"],
        "r": r,
        "lora_alpha": scale * r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: scale * v for k, v in rank_pattern.items()},
        "target_modules": sorted(ranks),
        "modules_to_save": [_head_name(run.tuned.model)],
        "lora_dropout": float(opts.dropout),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def export_peft(run_path: str | os.PathLike, out: str | os.PathLike, *, include_base: bool = True,
                overwrite: bool = False, weights: str | None = None) -> dict[str, Any]:
    """Write the run's LoRA as a PEFT adapter folder at ``out`` (plus ``base/``, the frozen backbone
    with the trained head as a plain timm folder, unless ``include_base=False``)."""
    from safetensors.torch import save_file

    run = load_run(run_path, weights)
    if run.task_class.own_head_module:  # a dense head: only a traced graph carries it
        raise refuse_dense(run, "peft")
    if run.method != "lora":
        raise refuse(run, "peft", "PEFT's LoRA adapter layout carries vistune's lora method only")
    tensors, ranks, scale = peft_tensors(run)
    config = peft_config(run, ranks, scale)
    out = Path(out)
    model = run.tuned.model
    with staged_dir(out, overwrite, source=run.path) as tmp:
        save_file(state_for_file(tensors), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        files = [CONFIG_FILE, WEIGHTS_FILE]
        load = {}
        if include_base:
            lora_prefixes = tuple(f"{n}." for n, m in model.named_modules() if _is_lora(m))
            base_state = {k: v for k, v in model.state_dict().items() if not k.startswith(lora_prefixes)}
            (tmp / BASE_DIR).mkdir()
            write_timm_folder(tmp / BASE_DIR, base_state, model, run, run.tuned.num_classes, run.class_names)
            files.append(f"{BASE_DIR}/")
            base_line = loader_lines((out / BASE_DIR).resolve(), run.backbone["arch"], {"num_classes": 0})
            load["base"] = base_line["local_dir"]
        load["adapter"] = f'peft.PeftModel.from_pretrained(base, "{out.resolve()}").eval()'
        info = sidecar(run, "peft", files=files + [SIDECAR], peft=config, load=load)
        write_json(tmp / SIDECAR, info)
    return info


def _is_lora(module: nn.Module) -> bool:
    return isinstance(module, (LoRABranch, ConvLoRA))


# ------------------------------------------------------------------------------------------------
# PEFT -> vistune


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``): the first pattern
    ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)`` wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise ExportError(f"PEFT adapter {folder}: no such folder")
    if not cfg_path.is_file():
        raise ExportError(f"PEFT adapter {folder}: {CONFIG_FILE} is missing")
    if not weights.is_file():
        other = " (only adapter_model.bin found; re-save it with safe_serialization=True)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise ExportError(f"PEFT adapter {folder}: {WEIGHTS_FILE} is missing{other}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"PEFT adapter {cfg_path}: not valid JSON ({err})") from None
    check_config_types(cfg_path, config)
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise ExportError(f"PEFT adapter {weights} is corrupt or truncated ({err})") from None
    return config, tensors


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config_types(cfg_path: Path, config: Any) -> None:
    """The keys the import reads must have PEFT's types: a config of ``[]`` or ``"r": "x"`` is
    refused here, naming the file, rather than failing later as an AttributeError or being
    silently read as another rank."""
    if not isinstance(config, dict):
        raise ExportError(f"PEFT adapter {cfg_path}: expected a JSON object (PEFT's LoraConfig), got "
                          f"{type(config).__name__}")
    if "r" in config and not _positive_int(config["r"]):
        raise ExportError(f"PEFT adapter {cfg_path}: r={config['r']!r} is not a positive integer rank")
    if "lora_alpha" in config and not _finite_number(config["lora_alpha"]):
        raise ExportError(f"PEFT adapter {cfg_path}: lora_alpha={config['lora_alpha']!r} is not a finite number")
    if config.get("lora_dropout") is not None and not _finite_number(config["lora_dropout"]):
        raise ExportError(f"PEFT adapter {cfg_path}: lora_dropout={config['lora_dropout']!r} is not a number")
    for key, ok, what in (("rank_pattern", _positive_int, "a positive integer rank"),
                          ("alpha_pattern", _finite_number, "a finite number")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ExportError(f"PEFT adapter {cfg_path}: {key} must be an object (pattern -> value), got {pattern!r}")
        bad = next((k for k, v in pattern.items() if not ok(v)), None)
        if bad is not None:
            raise ExportError(f"PEFT adapter {cfg_path}: {key}[{bad!r}]={pattern[bad]!r} is not {what}")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise ExportError(f"PEFT adapter {cfg_path}: modules_to_save={saved!r} is not a list of module names")


def _check_config(folder: Path, config: dict[str, Any], arch: str) -> None:
    folder = folder / CONFIG_FILE  # every message names the file that says so
    if config.get("peft_type") != "LORA":
        raise ExportError(f"PEFT adapter {folder}: peft_type {config.get('peft_type')!r} is not LORA; vistune "
                          "imports LoRA adapters only")
    bad = [k for k in _UNSUPPORTED_FLAGS if config.get(k)]
    if bad:
        raise ExportError(f"PEFT adapter {folder}: {bad[0]}={config[bad[0]]!r} changes the LoRA forward in a way "
                          "vistune's lora cannot express")
    if config.get("bias", "none") != "none":
        raise ExportError(f"PEFT adapter {folder}: bias={config['bias']!r} trains biases, which vistune's lora "
                          "does not carry; only bias='none' adapters import")
    named = str(config.get("base_model_name_or_path") or "")
    base = named.split("/")[-1].split(".")[0]
    if base and base != arch and _is_timm_arch(base):
        raise ExportError(f"PEFT adapter {folder} was made for {named!r}, not for backbone architecture {arch!r}")


def _is_timm_arch(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def import_peft(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, backbone: str,
                weights: str | None = None, img_size: int | None = None,
                class_names: list[str] | None = None) -> dict[str, Any]:
    """Turn a PEFT LoRA adapter trained on ``backbone`` into a vistune tuned file at ``out``.

    The backbone is built as ``vistune train`` builds it (``--backbone/--weights/--img-size``), so
    the tuned file's fingerprint matches the runs and serving that use the same backbone. Returns
    a summary (method spec, classes, what was dropped or folded).
    """
    folder = Path(adapter_dir)
    config, tensors = read_adapter(folder)
    cfg_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    model = build_backbone(backbone, weights, img_size)
    arch = backbone_info(model).arch
    _check_config(folder, config, arch)
    fp = fingerprint(model)
    exported = _vistune_sidecar(folder)
    _check_exported_on(folder, exported, fp)
    anatomy, hosts = _lora_hosts(model, weights_file)
    head_name = _head_name(model)
    head_keys = {f"{PREFIX}{head_name}.weight", f"{PREFIX}{head_name}.bias"}
    saved = [m for m in (config.get("modules_to_save") or [])]
    if any(m != head_name and not head_name.endswith("." + m) for m in saved):
        raise ExportError(f"PEFT adapter {cfg_file}: modules_to_save {saved} holds more than the classifier "
                          f"{head_name!r}; vistune's lora carries LoRA matrices and the head only")
    lora = _lora_tensors(tensors, head_keys, hosts, weights_file, anatomy)
    pieces, scalings = _pieces(model, lora, hosts, config, cfg_file, weights_file, arch)
    head_w = tensors[f"{PREFIX}{head_name}.weight"]
    if head_w.ndim != 2 or head_w.shape[1] != int(model.num_features):
        raise ExportError(f"PEFT adapter {weights_file} is for another architecture: its head reads "
                          f"{head_w.shape[-1]} features, {arch} gives {model.num_features}")
    targets, rank, scale, used = _one_rank(pieces, scalings)
    same_scale = len(set(scalings.values())) == 1
    num_classes = int(head_w.shape[0])
    spec = MethodSpec("lora", {"rank": rank, "alpha": scale * rank, "targets": targets,
                               "dropout": float(config.get("lora_dropout") or 0.0)})
    tuned = attach(model, spec, num_classes=num_classes, base_fingerprint=fp)
    state = _lora_state(anatomy, targets, rank, pieces, used, scalings)
    state[f"{head_name}.weight"] = head_w
    state[f"{head_name}.bias"] = tensors[f"{PREFIX}{head_name}.bias"]
    load_tensors(tuned, state, folder)

    names_from = class_names if class_names is not None else exported.get("class_names")
    if names_from is not None and len(names_from) != num_classes:
        raise ExportError(f"{len(names_from)} class names given, but the head in {weights_file} has {num_classes} "
                          "classes")
    extra = {"imported_from": {"peft_adapter": str(folder.resolve()), "peft_config": config}}
    if names_from:
        extra["class_names"] = list(names_from)
    path = tuned.save_tuned(out, extra=extra)
    return {
        "out": str(path),
        "method": tuned.spec.to_dict(),
        "num_classes": num_classes,
        "dropped_targets": sorted({t for _, t in pieces} - set(targets)),
        "scales_folded_into_B": not same_scale,
    }


def _check_exported_on(folder: Path, exported: dict[str, Any], fp: str) -> None:
    """An adapter vistune exported names its run's backbone fingerprint: refuse another backbone
    (other weights or image size) rather than import LoRA onto weights it was not trained with."""
    made_on = (exported.get("source") or {}).get("fingerprint")
    if made_on and made_on != fp and "meta" not in (made_on, fp):
        src = exported["source"]
        raise ExportError(
            f"PEFT adapter {folder / SIDECAR}: exported by vistune from a run on {src.get('backbone')!r} (weights "
            f"{src.get('weights')!r}, {exported.get('img_size')} px) whose fingerprint {made_on[:16]}... differs from "
            f"this backbone's {fp[:16]}... (other weights or image size)"
        )


def _lora_hosts(model: nn.Module, weights_file: Path) -> tuple[Anatomy, dict[str, list[tuple[str, slice]]]]:
    """Which module carries which roles (and their output rows), on any family the anatomy knows."""
    try:
        anatomy = describe(model)
    except BackboneError as err:
        raise ExportError(f"{err}; cannot import {weights_file}") from None
    hosts: dict[str, list[tuple[str, slice]]] = {}  # module name -> [(role, rows)]
    for site in (s for b in anatomy.blocks for s in b.sites):
        hosts.setdefault(site.name, []).append((site.role, site.rows))
    return anatomy, hosts


def _one_rank(pieces: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], scalings: dict[str, float],
              ) -> tuple[list[str], int, float, dict[tuple[str, str], torch.Tensor]]:
    """Drop columns (and whole targets) that contribute exactly zero; one rank, one scale (kept
    when every module shares it, else 1 with the scales folded into B)."""
    used = {key: (b != 0).any(dim=0).nonzero().flatten() for key, (a, b) in pieces.items()}
    targets = sorted({role for (_, role), cols in used.items() if cols.numel()}, key=ROLES.index)
    if not targets:
        targets = sorted({role for _, role in pieces}, key=ROLES.index)
    rank = max(1, max(int(cols.numel()) for (_, role), cols in used.items() if role in targets))
    same_scale = len(set(scalings.values())) == 1
    scale = next(iter(scalings.values())) if same_scale else 1.0
    return targets, rank, scale, used


def _lora_state(anatomy: Anatomy, targets: list[str], rank: int,
                pieces: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
                used: dict[tuple[str, str], torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """vistune's lora A/B for every target site, zero where the adapter had no matrices."""
    same_scale = len(set(scalings.values())) == 1
    state: dict[str, torch.Tensor] = {}
    for site in anatomy.sites(targets):
        conv = isinstance(site.module, nn.Conv2d)
        key = "all" if conv else site.role
        a_new = torch.zeros(rank, site.module.weight[0].numel())
        b_new = torch.zeros(site.rows.stop - site.rows.start, rank)
        if (site.name, site.role) in pieces:
            a, b = pieces[(site.name, site.role)]
            cols = used[(site.name, site.role)]
            n = int(cols.numel())
            a_new[:n] = a[cols]
            b_new[:, :n] = b[:, cols] * (1.0 if same_scale else scalings[site.name])
        state[f"{site.name}.lora.A.{key}"] = a_new
        state[f"{site.name}.lora.B.{key}"] = b_new
    return state


def _lora_tensors(tensors: dict[str, torch.Tensor], head_keys: set[str], hosts: dict[str, Any],
                  weights_file: Path, anatomy: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's lora_A/lora_B tensors by module, every key checked against what vistune carries."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in head_keys:
            continue
        if not key.startswith(PREFIX):
            raise ExportError(f"PEFT adapter {weights_file}: tensor {key!r} lacks PEFT's {PREFIX!r} prefix")
        m = re.match(r"^(.+)\.(lora_A|lora_B)\.weight$", key[len(PREFIX):])
        if m is None:
            raise ExportError(f"PEFT adapter {weights_file}: tensor {key!r} is not a LoRA A/B matrix or the head; "
                              "vistune's lora cannot carry it")
        module, part = m.groups()
        if module not in hosts:
            raise ExportError(f"PEFT adapter {weights_file}: LoRA on {module!r}, which is not a site of {anatomy.arch}'s "
                              f"blocks (roles {anatomy.offer()}; the adapter targets another architecture or module)")
        lora.setdefault(module, {})[part] = tensor.detach().float()
    if not lora:
        raise ExportError(f"PEFT adapter {weights_file}: holds no LoRA matrices")
    return lora


def _pieces(model: nn.Module, lora: dict[str, dict[str, torch.Tensor]], hosts: dict[str, list[tuple[str, slice]]],
            config: dict[str, Any], cfg_file: Path, weights_file: Path, arch: str
            ) -> tuple[dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """(module, role) → (A as rank × fan-in, B rows of that role), and PEFT's scaling per module.

    Shapes must be this backbone's: a Linear's A is r × in and B out × r; a Conv2d's A is PEFT's
    r-filter k×k conv (r, in/g, kh, kw) and B its 1×1 conv (out, r, 1, 1).
    """
    pieces: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scalings: dict[str, float] = {}
    for module, ab in sorted(lora.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"PEFT adapter {weights_file}: {module} has {sorted(ab)} but needs lora_A and lora_B")
        host = model.get_submodule(module)
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if isinstance(host, nn.Conv2d):
            fits = (a.ndim == 4 and tuple(a.shape[1:]) == tuple(host.weight.shape[1:]) and host.groups == 1
                    and tuple(b.shape) == (host.out_channels, r, 1, 1))
            want_shape = f"a {tuple(host.weight.shape)} conv"
        else:
            fits = a.ndim == 2 and b.ndim == 2 and a.shape[1] == host.in_features and b.shape == (host.out_features, r)
            want_shape = f"{host.in_features} -> {host.out_features}"
        if not fits:
            raise ExportError(
                f"PEFT adapter {weights_file} is for another architecture: {module} has lora_A {tuple(a.shape)} and "
                f"lora_B {tuple(b.shape)}, but {arch}'s {module} is {want_shape}"
            )
        a, b = a.reshape(r, -1), b.reshape(b.shape[0], r)
        want = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))  # PEFT's default r
        if want != r:  # PEFT would build rank-`want` matrices and refuse these tensors: so do we
            raise ExportError(f"PEFT adapter {cfg_file}: says rank {want} for {module}, but {weights_file} holds "
                              f"rank-{r} matrices there (lora_A {tuple(ab['lora_A'].shape)}); the config disagrees "
                              "with its tensors")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scalings[module] = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
        for role, rows in hosts[module]:
            pieces[(module, role)] = (a, b[rows])
    return pieces, scalings


def _vistune_sidecar(folder: Path) -> dict[str, Any]:
    """The vistune_export.json of an adapter vistune wrote ({} for adapters from elsewhere)."""
    try:
        data = json.loads((folder / SIDECAR).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}

