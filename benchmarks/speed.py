"""Train-step speed of every method as a ratio to full fine-tuning, plus HF PEFT's LoRA, fp32 and bf16.

What one step is: the engine's step for a classification batch — forward under the run's
precision, cross-entropy, backward, gradient clipping, an AdamW step and the schedule — on a
fixed batch (no data loading: this measures the methods, not the pipeline). Every variant is
built in this one process; each round times ``--steps`` steps of every variant in turn
(round-robin, so drift in machine speed hits every variant alike), and a variant's time is the
median over rounds. The ratio column divides by full fine-tuning's median in the same precision.

Activation memory is what autograd keeps for the backward pass: the bytes of the distinct
tensors saved during one forward (``saved_tensors_hooks``), parameters excluded.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed.py                 # DINOv2-S @112, batch 32
    .venv/bin/python benchmarks/speed.py --backbone test_vit --img-size 32 --rounds 2 --steps 2   # a smoke run
    .venv/bin/python benchmarks/speed.py --arch swin_tiny_patch4_window7_224 --img-size 112      # other families
    .venv/bin/python benchmarks/speed.py --arch convnext_tiny --img-size 112

A variant a backbone family cannot carry (``lora q,v`` on a ConvNeXt) is listed below the table
with the method's own one-line refusal instead of a time.

SPT's sensitivity pass (stage A) is timed apart and printed below the table: it is paid once per
task, not per step (``--sensitivity-batches 16`` times SPT's own default of 16 batches).

Time nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = {  # label: (method, options)
    "full": ("full", {}),
    "linear (no cache)": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "vpt-deep p10": ("vpt", {"length": 10, "deep": True}),
    "vpt pad p8": ("vpt", {"length": 8, "location": "pad"}),  # CNNs: a learnable pixel frame
    "lora r8 q,v": ("lora", {"rank": 8, "targets": "q,v"}),
    "lora r8 fc1,fc2": ("lora", {"rank": 8, "targets": "fc1,fc2"}),
    "lora r8 family default": ("lora", {"rank": 8}),  # q,v / ConvNeXt mlp / CNN convs (anatomy.py)
    "adapter b8": ("adapter", {"bottleneck": 8}),
    "spt-lora 0.15M": ("spt", {"budget": "0.15M", "structured": "lora"}),
    "spt-adapter 0.15M": ("spt", {"budget": "0.15M", "structured": "adapter"}),
    "protuning": ("protuning", {}),
}


def build(backbone: nn.Module, method: str, options: dict, num_classes: int, scores: Path | None) -> nn.Module:
    from vistune.tuning import attach

    opts = dict(options)
    if method == "spt":
        opts["sensitivity"] = str(scores)
    return attach(copy.deepcopy(backbone), method, num_classes=num_classes, **opts)


def build_peft(backbone: nn.Module, targets: list[str], rank: int, num_classes: int) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, modules_to_save=["head"])
    return get_peft_model(model, cfg)


def sensitivity_file(backbone: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, path: Path,
                     batches: int = 1) -> tuple[Path, float]:
    """SPT's stage A on ``batches`` copies of the benchmark batch, and the seconds it took.

    Timed apart from the train steps: it is paid once per task (SPT's reference pass is 16 batches,
    ``SPT.SENSITIVITY_BATCHES``), not per step, so it does not belong in the per-step ratio."""
    from vistune.sensitivity import compute_sensitivity, save_scores

    probe = copy.deepcopy(backbone)
    probe.reset_classifier(num_classes)
    t0 = time.perf_counter()
    scores = compute_sensitivity(probe, [(x, y)] * batches, num_batches=batches)
    seconds = time.perf_counter() - t0
    save_scores(path, scores, probe, {"note": f"speed benchmark: {batches} batch(es)"})
    return path, seconds


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    from vistune.engine.optim import apply_step, build_optimizer, warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "adamw", 1e-4, 0.01)
    sched = warmup_cosine(opt, 10**6, 0)
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        apply_step(opt, sched, params, 1.0)

    return step


def activation_mb(model: nn.Module, x: torch.Tensor, bf16: bool) -> float:
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
    del out
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", "--arch", default="dinov2-s14", help="a vistune weights name or any timm architecture")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precisions", default="auto",
                    help="comma-separated fp32,bf16; auto (default): fp32, plus bf16 where this CPU runs it natively "
                         "(an emulated bf16 table says nothing about vistune)")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="labels separated by ;")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd LoRA q,v and full")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--sensitivity-batches", type=int, default=1,
                    help="batches of SPT's sensitivity pass, timed apart and printed below the table "
                         "(SPT's own default is 16; the scores only choose the allocation here)")
    ap.add_argument("--fused-attention", action="store_true",
                    help="keep timm's fused SDPA attention (vistune switches it off on CPU; see set_fused_attention)")
    ap.add_argument("--frozen-bf16", action="store_true",
                    help="also time each PETL variant with its frozen Linear/Conv weights stored in bf16 (bf16 runs)")
    args = ap.parse_args()

    import tempfile

    from vistune.backbones import seeded_backbone

    torch.manual_seed(0)
    backbone = seeded_backbone(args.backbone, img_size=args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    tmp = Path(tempfile.mkdtemp())
    labels = [v.strip() for v in args.variants.split(";") if v.strip()]
    scores, sens_seconds = sensitivity_file(backbone, x, y, args.num_classes, tmp / "s.safetensors",
                                            args.sensitivity_batches) if any(
        VARIANTS[v][0] == "spt" for v in labels) else (None, None)
    from vistune.errors import MethodError

    models: dict[str, nn.Module] = {}
    refused: dict[str, str] = {}
    for v in labels:
        try:
            models[v] = build(backbone, *VARIANTS[v], args.num_classes, scores)
        except MethodError as err:
            refused[v] = str(err)
    labels = [v for v in labels if v in models]
    names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    if not args.no_peft:
        for label, targets in (("peft lora r8 qkv", ["qkv"]), ("peft lora r8 fc1,fc2", ["fc1", "fc2"])):
            if not set(targets) <= names:
                continue  # PEFT would match nothing on this family
            m = build_peft(backbone, targets, 8, args.num_classes)
            if m is not None:
                models[label] = m
    if args.frozen_bf16:
        for label in [v for v in labels if VARIANTS[v][0] not in ("full", "linear")]:
            m = build(backbone, *VARIANTS[label], args.num_classes, scores)
            m.cast_frozen_matmul_weights(torch.bfloat16)
            models[f"{label} frozen-bf16"] = m
    if args.compile:
        for label in ("full", "lora r8 q,v"):
            if label in models:
                models[f"{label} compiled"] = torch.compile(build(backbone, *VARIANTS[label], args.num_classes, scores))

    if not args.fused_attention:  # what vistune runs do on CPU (backbones.set_fused_attention)
        from vistune.backbones import set_fused_attention

        for m in models.values():
            set_fused_attention(m, False)
    from vistune.precision import machine_line, native_bf16

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if precisions == ["auto"]:
        precisions = ["fp32", "bf16"] if native_bf16(torch.device("cpu"))[0] else ["fp32"]
    rows = []
    for prec in precisions:
        bf16 = prec == "bf16"
        steps = {label: make_step(m, x, y, bf16) for label, m in models.items()
                 if bf16 or "frozen-bf16" not in label}  # bf16-stored weights are for bf16 runs only
        for fn in steps.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(args.rounds):
            for label, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[label].append((time.perf_counter() - t0) / args.steps)
        base = statistics.median(times["full"]) if "full" in times else None
        for label, ts in times.items():
            med = statistics.median(ts)
            m = models[label]
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            rows.append((prec, label, med * 1000, med / base if base else float("nan"), args.batch_size / med,
                         activation_mb(m, x, bf16), trainable))

    attn = "fused SDPA" if args.fused_attention else "explicit (vistune's CPU default)"
    print("\n" + machine_line(",".join(precisions)))
    print(f"{args.backbone} @{args.img_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"attention {attn}, median of {args.rounds} rounds x {args.steps} steps, torch {torch.__version__}\n")
    print("| precision | variant | ms/step | × full FT | img/s | activations MB | trainable params |")
    print("|---|---|---|---|---|---|---|")
    for prec, label, ms, ratio, ips, act, n in rows:
        print(f"| {prec} | {label} | {ms:.0f} | {ratio:.2f} | {ips:.1f} | {act:.0f} | {n:,} |")
    for label, why in refused.items():
        print(f"\nnot run: {label}: {why}")
    if sens_seconds is not None:
        from vistune.methods.spt import SPT

        per = sens_seconds / args.sensitivity_batches
        print(f"\nSPT sensitivity pass (stage A, paid once per task, not per step; fp32, "
              f"{torch.get_num_threads()} threads): {sens_seconds:.1f} s for {args.sensitivity_batches} "
              f"batch(es) of {args.batch_size} = {per:.2f} s/batch; SPT's default {SPT.SENSITIVITY_BATCHES} "
              f"batches ≈ {per * SPT.SENSITIVITY_BATCHES:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
