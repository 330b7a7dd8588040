"""LoRA, Adapter and SPT on every backbone family the anatomy describes (ViT, Swin, ConvNeXt,
ResNet incl. CIFAR, EfficientNet/MobileNet), on tiny random-init timm models with real shapes.

Random-init ConvNeXt blocks scale their branch by a layer-scale of 1e-6 and timm's ResNets zero
the last BatchNorm of each block, so a tuned module there would change the output by ~1e-6 and
"merge equals unmerged" could not fail; :func:`lively` sets those scales to one first.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vistune import attach
from vistune.anatomy import describe
from vistune.cli import main
from vistune.errors import MethodError

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN = dict(img_size=56, window_size=7, embed_dim=24, depths=(2, 2), num_heads=(2, 2), patch_size=4)
#: name -> (timm name, kwargs, input size)
MODELS = {
    "vit": ("test_vit", {}, 32),
    "swin": ("swin_tiny_patch4_window7_224", SWIN, 56),
    "convnext": ("test_convnext", {}, 64),
    "resnet": ("test_resnet", {}, 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "cifar-resnet": ("resnet20_cifar", {}, 32),
}


def lively(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.fill_(1.0)
    return model


def build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    import timm

    import vistune.cifar_resnet  # noqa: F401 - registers resnet20_cifar

    name, kwargs, size = MODELS[kind]
    torch.manual_seed(0)
    model = lively(timm.create_model(name, num_classes=0, **kwargs)).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def perturb(params) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def lora_closed_form(model: nn.Module, targets: list[str], rank: int) -> int:
    """r·(in + rows) per Linear row-slice, r·(in/g·kh·kw + out) per conv — from module shapes only."""
    total = 0
    for site in describe(model).sites(targets):
        m = site.module
        if isinstance(m, nn.Conv2d):
            total += rank * (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        else:
            total += rank * (m.in_features + site.rows.stop - site.rows.start)
    return total


FAMILY_LORA = [("vit", "q,v"), ("swin", "q,v"), ("swin", "attn,mlp"), ("convnext", "mlp"), ("convnext", "dw"),
               ("resnet", "convs"), ("efficientnet", "pw"), ("efficientnet", "conv"), ("cifar-resnet", "conv")]


@pytest.mark.parametrize("kind,targets", FAMILY_LORA)
def test_lora_on_every_family(kind, targets):
    model, x = build(kind)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    ref = features(model, x)
    tuned = attach(model, "lora", num_classes=3, rank=2, alpha=4.0, targets=targets)
    params = tuned.method.tuned_parameters(tuned.model)
    assert sum(p.numel() for p in params) == lora_closed_form(tuned.model, targets.split(","), 2)
    assert torch.allclose(features(tuned.model, x), ref, atol=1e-6), "B = 0 must leave the backbone unchanged"
    perturb(params)
    moved = features(tuned.model, x)
    assert (moved - ref).abs().max() > 1e-2 * ref.abs().max(), "the update must reach the output"
    with torch.no_grad():
        before = tuned.model(x)
    tuned.method.merge(tuned.model)
    with torch.no_grad():
        merged = tuned.model(x)
    assert (merged - before).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())
    tuned.method.unmerge(tuned.model)
    state = tuned.model.state_dict()
    for k, v in frozen.items():
        assert torch.allclose(state[k], v, atol=1e-5), f"{k} changed after merge + unmerge"


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_on_every_family(kind):
    model, x = build(kind)
    anatomy = describe(model)
    ref = features(model, x)
    tuned = attach(model, "adapter", num_classes=3, bottleneck=4)
    params = tuned.method.tuned_parameters(tuned.model)
    expected = 0
    for b in anatomy.blocks:  # beside the MLP: D·r + r + r·D + D; parallel conv: in·r + r + r·out + out
        expected += (b.in_width * 4 + 4 + 4 * b.out_width + b.out_width) if b.mlp is None else (
            b.in_width * 4 + 4 + 4 * b.in_width + b.in_width)
    assert sum(p.numel() for p in params) == expected
    assert torch.allclose(features(tuned.model, x), ref, atol=1e-6), "zero-initialised up must be an identity"
    # One optimiser step: only the adapters (and the head) move.
    frozen = {n: p.detach().clone() for n, p in tuned.model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in tuned.model.parameters() if p.requires_grad], lr=0.5)
    tuned.model.train()
    loss = nn.functional.cross_entropy(tuned.model(x), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    for n, p in tuned.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} moved"
    tuned.model.eval()
    assert (features(tuned.model, x) - ref).abs().max() > 1e-6


def test_conv_adapter_handles_stride_and_width_changes():
    """EfficientNet's inverted residuals change width and stride; a wrong stride fails the add."""
    model, x = build("efficientnet")
    strided = [b for b in describe(model).blocks if b.stride > 1 or b.in_width != b.out_width]
    assert strided, "the test model must have blocks that change shape"
    tuned = attach(model, "adapter", num_classes=3, bottleneck=2)
    perturb(tuned.method.tuned_parameters(tuned.model))
    with torch.no_grad():
        assert torch.isfinite(tuned.model(x)).all()


def test_roles_mean_the_same_across_families():
    vit, _ = build("vit")
    swin, _ = build("swin")
    for model in (vit, swin):
        sites = describe(model).sites(["q", "v"])
        qkv = sites[0].module
        d = qkv.out_features // 3
        assert sites[0].rows == slice(0, d) and sites[1].rows == slice(2 * d, 3 * d)
    assert describe(build("resnet")[0]).roles() == ["pw", "conv"]
    assert describe(build("convnext")[0]).expand(["mlp"]) == ["fc1", "fc2"]


def test_module_patterns_add_any_linear_or_conv():
    model, x = build("swin")
    tuned = attach(model, "lora", num_classes=3, rank=2, modules="layers.*.blocks.*.attn.proj")
    hosts = [n for n, m in tuned.model.named_modules() if n.endswith(".lora")]
    assert hosts and all(h.endswith("attn.proj.lora") for h in hosts)
    assert tuned.method.options.targets is None  # patterns alone: no role defaults added


@pytest.mark.parametrize("kind,options,needle", [
    ("resnet", {"targets": "q,v"}, "roles offered: pw, conv"),
    ("convnext", {"targets": "q"}, "roles offered: fc1, fc2, dw"),
    ("swin", {"modules": "*.norm1"}, "a LayerNorm; only nn.Linear and nn.Conv2d"),
    ("vit", {"modules": "no_such.module"}, "matches no backbone module"),
    ("vit", {"modules": "head"}, "matches no backbone module"),  # the classifier never carries an update
])
def test_lora_bad_targets_are_one_line(kind, options, needle):
    model, _ = build(kind)
    with pytest.raises(MethodError) as err:
        attach(model, "lora", num_classes=3, **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_names_the_roles_and_exits_2(capsys):
    code = main(["info", "--backbone", "test_resnet", "--method", "lora", "-o", "targets=q,v"])
    err = capsys.readouterr().err
    assert code == 2 and "test_resnet (resnet) has no q,v sites; roles offered: pw, conv, convs" in err


def test_lora_refuses_qkv_read_through_f_linear():
    """EVA/Swin-V2 attention reads qkv.weight with F.linear when it has q/v biases: a hook there never runs."""
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", num_classes=0, img_size=28, depth=1)
    with pytest.raises(MethodError, match="F.linear"):
        attach(model, "lora", num_classes=3, targets="q,v")
    tuned = attach(timm.create_model("eva02_tiny_patch14_224", num_classes=0, img_size=28, depth=1),
                   "lora", num_classes=3, targets="proj,fc2")
    assert tuned.method.tuned_parameters(tuned.model)


@pytest.mark.parametrize("kind", ["swin", "convnext", "resnet"])
def test_spt_on_other_families(kind, tmp_path):
    """Sensitivity and the structured allocation run on each family; Swin's fused qkv splits into q/k/v."""
    from vistune.sensitivity import compute_sensitivity, save_scores
    from vistune.sensitivity.scores import pool_units

    model, x = build(kind)
    probe, _ = build(kind)
    probe.reset_classifier(3)
    batches = [(x, torch.tensor([0, 2]))]
    scores = tmp_path / "s.safetensors"
    save_scores(scores, compute_sensitivity(probe, batches, num_batches=1), probe, {"num_batches": 1})
    if kind == "swin":
        parts = {u.part for u in pool_units(model) if u.param.endswith("attn.qkv.weight")}
        assert parts == {"q", "k", "v"}
    tuned = attach(model, "spt", num_classes=3, sensitivity=str(scores), budget="5%", structured="lora", rank=2)
    perturb(tuned.method.tuned_parameters(tuned.model))
    with torch.no_grad():
        assert torch.isfinite(tuned.model(x)).all()


def test_peft_export_of_conv_lora_gives_equal_logits(tmp_path):
    pytest.importorskip("peft")
    import timm
    from peft import PeftModel

    from vistune.backbones import seeded_backbone
    from vistune.export import export, load_run

    tuned = attach(seeded_backbone("test_efficientnet", None, 64), "lora", num_classes=3, rank=2, alpha=3.0,
                   targets="convs")  # 1x1 and full kxk convs; timm's test_resnet zeroes each block's last BN
    perturb(tuned.method.tuned_parameters(tuned.model))
    tuned.save_tuned(tmp_path / "run" / "tuned.safetensors")
    export(tmp_path / "run", "peft", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 3.0
    base = timm.create_model(f"local-dir:{tmp_path / 'out' / 'base'}", pretrained=True)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, ref = peft_model(x), load_run(tmp_path / "run").model(x)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    run = load_run(tmp_path / "run")
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if ".lora.B." in name:
                p.zero_()
        without = run.model(x)
    assert (ref - without).abs().max() > 1e-3 * ref.abs().max(), "the conv updates must matter"


def test_peft_export_refuses_depthwise_conv_lora(tmp_path):
    from vistune.backbones import seeded_backbone
    from vistune.export import ExportError, export

    tuned = attach(seeded_backbone("test_efficientnet", None, 64), "lora", num_classes=3, rank=2, targets="dw")
    tuned.save_tuned(tmp_path / "run" / "tuned.safetensors")
    with pytest.raises(ExportError, match="grouped convolution"):
        export(tmp_path / "run", "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backbone,method,options", [
    ("test_efficientnet", "lora", ["targets=pw,dw", "rank=2"]),
    ("test_resnet", "adapter", ["bottleneck=4"]),
    ("test_convnext", "lora", ["targets=mlp"]),
])
def test_train_then_eval_and_export_on_other_families(backbone, method, options, tmp_path, capsys):
    """The whole CLI path — train, eval from the run folder, timm/ONNX export — on non-ViT families."""
    from test_engine import make_folder

    make_folder(tmp_path / "data", size=32)
    out = tmp_path / "run"
    opts = [a for o in options for a in ("-o", o)]
    assert main(["train", "--backbone", backbone, "--img-size", "32", "--method", method, *opts,
                 "--data", f"folder:{tmp_path / 'data'}", "--epochs", "1", "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--tuned", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)  # the run rebuilt as trained
    fmt = "timm" if method == "lora" else "onnx"
    assert main(["export", "--tuned", str(out), "--format", fmt, "--out", str(tmp_path / "exp")]) == 0


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["protuning", "bitfit"])
def test_protuning_and_bitfit_keep_working_everywhere(kind, method):
    model, x = build(kind)
    ref = features(model, x)
    tuned = attach(model, method, num_classes=3)
    params = tuned.method.tuned_parameters(tuned.model)
    assert params and all(p.requires_grad for p in params)
    assert torch.allclose(features(tuned.model, x), ref, atol=1e-6), "a fresh attachment changes nothing"
    perturb(params)
    assert (features(tuned.model, x) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_import_native_peft_conv_lora_gives_equal_logits(tmp_path):
    """A LoRA adapter PEFT itself made on a CNN's convolutions imports into vistune exactly."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from vistune.backbones import seeded_backbone
    from vistune.export import import_peft, load_run

    model = seeded_backbone("test_efficientnet", None, 64)
    model.reset_classifier(3)
    native = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["conv_pw", "conv_pwl"],
                                              modules_to_save=["classifier"]))
    perturb([p for n, p in native.named_parameters() if "lora_" in n or "classifier" in n])
    native.save_pretrained(tmp_path / "native")
    info = import_peft(tmp_path / "native", tmp_path / "run" / "tuned.safetensors", backbone="test_efficientnet",
                       img_size=64)
    assert info["method"]["options"]["targets"] == ["pw"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = native.eval()(x), load_run(tmp_path / "run").model(x)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind,method,options", [
    ("swin", "lora", {}), ("swin", "vpt", {"length": 2, "deep": True}), ("convnext", "adapter", {}),
    ("cifar-resnet", "vpt", {"length": 2, "location": "below"}), ("efficientnet", "lora", {}),
])
@pytest.mark.parametrize("task", ["segment", "detect"])
def test_dense_heads_on_other_families(kind, method, options, task):
    """Multi-scale features from each family's stages feed the segmentation and detection heads."""
    from vistune.dense.model import build_dense_model

    model, x = build(kind)
    dense = build_dense_model(attach(model, method, **options), task, num_classes=3).eval()
    feats = dense.features(x)
    strides = [x.shape[-1] // f.shape[-1] for f in feats]
    assert strides == sorted(strides) and len(set(strides)) == len(strides), strides  # finest first, distinct
    with torch.no_grad():
        out = dense(x)
    if task == "segment":
        assert out.shape == (2, 3, x.shape[-2], x.shape[-1])
    else:
        assert out["cls"].shape[0] == 2 and torch.isfinite(out["box"]).all()


def test_tf_ports_with_dynamic_same_padding():
    """EfficientNet-Lite0 as the zoo builds it (tf_ port): stride-2 depthwise convs are timm's
    Conv2dSame. They count for a block's stride (a parallel adapter must downsample alike) and
    carry Conv-LoRA through the same dynamic pad; merging stays exact."""
    import timm
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    anatomy = describe(model)
    same = [s for s in anatomy.sites(["dw"]) if type(s.module) is Conv2dSame]
    assert same, "the tf port must have Conv2dSame depthwise convs"
    assert any(b.stride == 2 for b in anatomy.blocks if any(s.module is same[0].module for s in b.sites))
    ref = features(model, x)
    adapted = attach(model, "adapter", num_classes=3, bottleneck=2)
    assert torch.allclose(features(adapted.model, x), ref, atol=1e-6)
    perturb(adapted.method.tuned_parameters(adapted.model))
    assert torch.isfinite(features(adapted.model, x)).all()

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    tuned = attach(model, "lora", num_classes=3, rank=2, targets="dw")
    perturb(tuned.method.tuned_parameters(tuned.model))
    with torch.no_grad():
        before = tuned.model(x)
    assert (features(tuned.model, x) - ref).abs().max() > 1e-3 * ref.abs().max()
    tuned.method.merge(tuned.model)
    with torch.no_grad():
        assert (tuned.model(x) - before).abs().max() <= 1e-4 * max(1.0, before.abs().max().item())
