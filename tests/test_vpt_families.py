"""VPT beyond the plain ViT: Swin v1 (prompts inside every window) and ConvNets (pad, below).

The Swin reference is written out here from a block's own submodules (norm1, attn.qkv,
attn.proj, the class's ``_get_rel_pos_bias``, the shift mask, mlp) following VPT's
``PromptedSwinTransformerBlock``, so a wrong padding side, a bias or mask given to the prompt
rows, a window-major expansion or a leaked prompt all change the numbers.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

from tests.test_engine import make_folder
from vistune import attach, create_backbone
from vistune.cli import main
from vistune.errors import MethodError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_swin(depths=(2, 2, 1, 1), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_backbone("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=depths,
                            num_heads=(2, 2, 2, 2), window_size=7, num_classes=3)
    with torch.no_grad():  # peaked attention and a bias large enough that giving it to the wrong rows shows
        for layer in model.layers:
            for blk in layer.blocks:
                blk.attn.relative_position_bias_table.normal_(0.0, 1.0)
                blk.attn.qkv.weight.mul_(8.0)
    return model.eval()


def images(n: int = 2, size: int = 56, seed: int = 1) -> torch.Tensor:
    """Images of clearly different statistics, so that one image's prompts differ from another's."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x * torch.linspace(0.5, 2.0, n).view(n, 1, 1, 1) + torch.linspace(-1.0, 1.0, n).view(n, 1, 1, 1)


def perturb(tuned, scale: float = 0.5, head: bool = False) -> None:
    """Move the prompts (and the head when asked) off their init."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.tuned_parameters() if head else tuned.model.vpt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------------
# Swin: the reference


def to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def from_windows(t: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    return t.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def ref_block(blk: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompted Swin block: prompts first in every window of their image, zero bias and mask
    for their rows/columns, outputs averaged over the image's windows, residual + MLP like tokens."""
    b, h, w, c = x.shape
    p, ws, sh, a = prompts.shape[1], blk.window_size[0], blk.shift_size[0], blk.attn
    xn = blk.norm1(x)
    if sh:
        xn = torch.roll(xn, (-sh, -sh), (1, 2))
    win = to_windows(xn, ws)
    nw = win.shape[0] // b
    pn = blk.norm1(prompts)
    t = torch.cat([pn[i:i + 1].expand(nw, -1, -1) for i in range(b)], 0)  # window b*nW + w: image b's
    t = torch.cat([t, win], 1)
    n, heads = t.shape[1], a.num_heads
    q, k, v = a.qkv(t).reshape(b * nw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * a.scale) @ k.transpose(-2, -1)
    bias = torch.zeros(heads, n, n)
    bias[:, p:, p:] = type(a)._get_rel_pos_bias(a)[0]
    logits = logits + bias
    if blk.attn_mask is not None:
        mask = torch.zeros(nw, n, n)
        mask[:, p:, p:] = blk.attn_mask
        logits = logits + mask.repeat(b, 1, 1).unsqueeze(1)
    out = a.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b * nw, n, -1))
    prompt_out = out[:, :p].reshape(b, nw, p, c).mean(1)
    xo = from_windows(out[:, p:], ws, b, h, w)
    if sh:
        xo = torch.roll(xo, (sh, sh), (1, 2))
    x, prompts = x + xo, prompts + prompt_out
    return x + blk.mlp(blk.norm2(x)), prompts + blk.mlp(blk.norm2(prompts))


def ref_forward(model: nn.Module, x: torch.Tensor, vpt: nn.Module, deep: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output and the logits."""
    h = model.patch_embed(x)
    prompts = vpt.shallow.expand(len(x), -1, -1)
    blocks = []
    for s, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            h = stage.downsample(h)
            # VPT's PromptedPatchMerging: four copies along the channels, then norm + reduction
            prompts = stage.downsample.reduction(stage.downsample.norm(torch.cat([prompts] * 4, -1)))
        for j, blk in enumerate(stage.blocks):
            if deep and (s, j) != (0, 0):
                prompts = vpt.deep[str(s)][j - 1 if s == 0 else j].expand(len(x), -1, -1)
            h, prompts = ref_block(blk, h, prompts)
            blocks.append(h)
    return blocks, model.forward_head(model.norm(h))  # patch tokens only: prompts never reach the pool


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("fused", [False, True], ids=["matmul", "sdpa"])
def test_swin_equals_hand_computed_prompted_blocks(deep, fused):
    base = tiny_swin()
    assert any(blk.attn_mask is not None for layer in base.layers for blk in layer.blocks)  # a shift is tested
    tuned = attach(copy.deepcopy(base), "vpt", length=3, deep=deep).eval()
    perturb(tuned)
    for layer in tuned.model.layers:
        for blk in layer.blocks:
            blk.attn.fused_attn = fused
    x = images(2)
    got_blocks = []
    for layer in tuned.model.layers:
        for blk in layer.blocks:
            blk.register_forward_hook(lambda m, a, out: got_blocks.append(out))
    with torch.no_grad():
        want_blocks, want = ref_forward(base, x, tuned.model.vpt, deep)
        got = tuned(x)
        assert not torch.allclose(got, base(x), atol=1e-3)  # the prompts do something
    for i, (g, w) in enumerate(zip(got_blocks, want_blocks, strict=True)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"block {i}: {m}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_swin_rows_are_independent(deep):
    """Each image sees its own prompts only (a window-major expansion mixes them when B > 1)."""
    tuned = attach(tiny_swin(), "vpt", length=2, deep=deep).eval()
    perturb(tuned)
    x = images(3)
    with torch.no_grad():
        together = tuned(x)
        alone = torch.cat([tuned(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_swin_gradients_reach_every_prompt_and_nothing_frozen_moves():
    tuned = attach(tiny_swin(), "vpt", length=2, deep=True, num_classes=3)
    tuned.train()
    frozen = {n: t.clone() for n, t in tuned.model.state_dict().items() if not n.startswith(("vpt.", "head."))}
    names = [n for n, _ in tuned.model.vpt.named_parameters()]
    assert names == ["shallow", "deep.0", "deep.1", "deep.2", "deep.3"]
    opt = torch.optim.SGD(tuned.tuned_parameters(), lr=0.5)
    nn.functional.cross_entropy(tuned(images(2)), torch.tensor([0, 2])).backward()
    for n, p in tuned.model.vpt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    after = tuned.model.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)


def test_swin_parameter_counts_equal_the_closed_forms():
    tiny = tiny_swin(depths=(2, 2, 1, 1))
    widths, depths, p = (24, 48, 96, 192), (2, 2, 1, 1), 3
    assert attach(copy.deepcopy(tiny), "vpt", length=p).parameter_report()["tuned_params"] == p * widths[0]
    deep = attach(tiny, "vpt", length=p, deep=True)
    assert deep.parameter_report()["tuned_params"] == p * sum(w * d for w, d in zip(widths, depths))
    assert tuple(deep.model.vpt.deep["0"].shape) == (1, p, 24)  # stage 0: its first block reads the shallow ones
    # Swin-B (embed 128, depths 2,2,18,2) on the meta device: the README's numbers
    counts = {}
    for is_deep in (False, True):
        with torch.device("meta"):
            model = timm.create_model("swin_base_patch4_window7_224", num_classes=0)
        counts[is_deep] = attach(model, "vpt", length=50, deep=is_deep).parameter_report()["tuned_params"]
    assert counts[False] == 50 * 128 == 6_400
    assert counts[True] == 50 * (128 * 2 + 256 * 2 + 512 * 18 + 1024 * 2) == 601_600


def test_remove_hooks_restores_the_class_bias_method_and_leaves_other_attachments_alone():
    base = tiny_swin()
    a = attach(copy.deepcopy(base), "vpt", length=2)
    b = attach(copy.deepcopy(base), "vpt", length=2, deep=True)
    perturb(a)
    x = images(2)
    with torch.no_grad():
        want_a, plain = a(x), base(x)
    b.method.remove_hooks()
    for layer in b.model.layers:
        for blk in layer.blocks:
            assert "_get_rel_pos_bias" not in vars(blk.attn)
            assert blk.attn._get_rel_pos_bias.__func__ is type(blk.attn)._get_rel_pos_bias
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), plain, rtol=0, atol=0)
        torch.testing.assert_close(a(x), want_a, rtol=0, atol=0)  # no state shared between the two


def test_swin_v2_and_rope_vits_are_refused_in_one_line():
    v2 = create_backbone("swinv2_tiny_window8_256", img_size=64, embed_dim=24, depths=(1, 1, 1, 1),
                         num_heads=(1, 1, 1, 1), window_size=8, num_classes=3)
    with pytest.raises(MethodError, match=r"swinv2_tiny_window8_256.*inline.*lora, adapter or protuning") as err:
        attach(v2, "vpt")
    assert "\n" not in str(err.value)
    eva = create_backbone("eva02_tiny_patch14_224", img_size=28, depth=1, num_classes=3)
    with pytest.raises(MethodError, match=r"eva02_tiny_patch14_224.*rope.*lora, adapter or protuning") as err:
        attach(eva, "vpt")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# ConvNets: pad and below


CNNS = ["resnet18", "efficientnet_lite0", "convnext_atto"]


def cnn(arch: str, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(arch, img_size=size, num_classes=3).eval()


def stem_inputs(model: nn.Module, stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = stem.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("arch", CNNS)
def test_pad_frames_the_image_at_its_size(arch):
    s, p = 32, 3
    tuned = attach(cnn(arch, s), "vpt", location="pad", length=p).eval()
    vpt = tuned.model.vpt
    assert tuned.parameter_report()["tuned_params"] == 3 * (2 * p * (s + 2 * p) + s * 2 * p)
    assert tuple(vpt.tb.shape) == (1, 3, 2 * p, s + 2 * p) and tuple(vpt.lr.shape) == (1, 3, s, 2 * p)
    assert 0 <= float(vpt.tb.detach().min()) and float(vpt.tb.detach().max()) <= 1  # uniform(0, 1), pixel space
    from vistune.anatomy import describe

    x = images(2, s)
    seen = stem_inputs(tuned.model, describe(tuned.model).stem, x)
    assert seen.shape == (2, 3, s + 2 * p, s + 2 * p)
    torch.testing.assert_close(seen[:, :, p:-p, p:-p], x, rtol=0, atol=0)  # the image, untouched, inside
    mean = torch.tensor(tuned.model.vistune_info.mean).view(1, 3, 1, 1)
    std = torch.tensor(tuned.model.vistune_info.std).view(1, 3, 1, 1)
    tb, lr = (vpt.tb - mean) / std, (vpt.lr - mean) / std  # normalised like the images
    torch.testing.assert_close(seen[:, :, :p], tb[:, :, :p].expand(2, -1, -1, -1))
    torch.testing.assert_close(seen[:, :, -p:], tb[:, :, p:].expand(2, -1, -1, -1))
    torch.testing.assert_close(seen[:, :, p:-p, :p], lr[..., :p].expand(2, -1, -1, -1))
    torch.testing.assert_close(seen[:, :, p:-p, -p:], lr[..., p:].expand(2, -1, -1, -1))
    with pytest.raises(MethodError, match=r"location=pad was built for 32x32 images.*got 40x40"):
        tuned(images(1, 40))


@pytest.mark.parametrize("arch", CNNS + ["test_resnet"])
def test_below_is_the_widened_stem_with_the_original_weights_frozen(arch):
    from vistune.anatomy import describe

    s, c = 32, 2
    base = cnn(arch, s)
    tuned = attach(copy.deepcopy(base), "vpt", location="below", length=c, num_classes=3)
    stem = describe(tuned.model).stem
    out_ch, in_ch, kh, kw = stem.weight.shape
    vpt = tuned.model.vpt
    assert tuned.parameter_report()["tuned_params"] == c * s * s + out_ch * c * kh * kw
    bound = (6 / ((in_ch + c) * kh * kw + out_ch * kh * kw)) ** 0.5
    assert float(vpt.weight.detach().abs().max()) <= bound
    x = images(2, s)
    # the stem's output is the (in + c)-channel convolution of [image; normalised maps]
    got = []
    handle = stem.register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        tuned.eval()(x)
    handle.remove()
    info = tuned.model.vistune_info
    maps = (vpt.maps - sum(info.mean) / 3) / (sum(info.std) / 3)
    wide = torch.cat([stem.weight, vpt.weight], 1)
    want = nn.functional.conv2d(torch.cat([x, maps.expand(2, -1, -1, -1)], 1), wide, stem.bias, stem.stride,
                                stem.padding, stem.dilation)
    torch.testing.assert_close(got[-1], want, rtol=1e-5, atol=1e-5)
    # zero new weights: exactly the backbone
    with torch.no_grad():
        vpt.weight.zero_()
        torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)
    # training moves the prompts and the new weights, never the original stem
    stem_w = stem.weight.clone()
    perturb(tuned, 0.05)
    tuned.train()
    opt = torch.optim.SGD(tuned.tuned_parameters(), lr=0.5)
    nn.functional.cross_entropy(tuned(x), torch.tensor([0, 1])).backward()
    assert vpt.maps.grad.abs().sum() > 0 and vpt.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(stem.weight, stem_w)


def test_bad_locations_are_refused_in_one_line():
    resnet = cnn("test_resnet")
    with pytest.raises(MethodError, match=r"location=prepend.*VisionTransformer.*use -o location=pad"):
        attach(resnet, "vpt")
    with pytest.raises(MethodError, match=r"deep=true needs location=prepend"):
        attach(cnn("test_resnet"), "vpt", location="pad", deep=True)
    with pytest.raises(MethodError, match=r"location must be one of prepend, pad, below"):
        attach(cnn("test_resnet"), "vpt", location="side")
    with pytest.raises(MethodError, match=r"location=pad.*tiny_patch4.*fixed S"):
        attach(tiny_swin(), "vpt", location="pad")


def test_below_on_swin_adds_no_tokens():
    base = tiny_swin()
    tuned = attach(copy.deepcopy(base), "vpt", location="below", length=2).eval()
    x = images(2)
    with torch.no_grad():
        assert tuned.model.forward_features(x).shape == base.forward_features(x).shape
        tuned.model.vpt.weight.zero_()
        torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)
    assert tuned.method.routing().own_pass is False and tuned.method.routing().tokens == 0


def test_convnext_base_closed_forms_on_meta():
    with torch.device("meta"):
        pad = timm.create_model("convnext_base", num_classes=0)
        below = timm.create_model("convnext_base", num_classes=0)
    s = 224
    assert attach(pad, "vpt", location="pad", length=10).parameter_report()["tuned_params"] == \
        3 * (2 * 10 * (s + 20) + s * 20) == 28_080
    assert attach(below, "vpt", location="below", length=1).parameter_report()["tuned_params"] == \
        1 * s * s + 128 * 1 * 4 * 4 == 52_224


# ------------------------------------------------------------------------------------------------
# Serving and the CLI


def test_swin_vpt_tasks_run_in_their_own_pass_and_equal_their_own_model(tmp_path):
    from vistune.serve.multitask import MultiTaskModel

    files, own = {}, {}
    for name, method, opts in (("shallow", "vpt", {"length": 2}), ("deep", "vpt", {"length": 3, "deep": True}),
                               ("linear", "linear", {})):
        tuned = attach(tiny_swin(), method, num_classes=3, **opts)
        perturb(tuned, 0.1, head=True)
        own[name] = tuned.eval()
        files[name] = tuned.save_tuned(tmp_path / f"{name}.safetensors")
    mt = MultiTaskModel(tiny_swin())
    for name, path in files.items():
        mt.add_task(name, path)
    assert mt.tasks["shallow"].own_pass and mt.tasks["deep"].own_pass and not mt.tasks["linear"].own_pass
    tasks = ["deep", "linear", "shallow", "deep", "shallow", "linear"]
    x = images(len(tasks))
    out = mt.forward(x, tasks)
    for name in files:
        idx = [i for i, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            want = own[name](x[idx])
        torch.testing.assert_close(torch.cat([out[i] for i in idx]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["swin", "pad", "below"])
def test_onnx_graph_matches_torch_at_batch_2_and_1(kind, tmp_path):
    """The hooks trace: window counts stay symbolic (an ONNX graph traced at batch 2 runs batch 1)."""
    pytest.importorskip("onnxruntime")
    from vistune.export.onnx_format import check_graph, write_onnx

    if kind == "swin":
        tuned, x = attach(tiny_swin(), "vpt", length=2, num_classes=3), images(2)
    else:
        tuned, x = attach(cnn("resnet18"), "vpt", location=kind, length=2, num_classes=3), images(2, 32)
    perturb(tuned.eval())
    write_onnx(tuned.model, x, tmp_path / "m.onnx", ("logits",))
    assert check_graph(tmp_path / "m.onnx", tuned.model, x, ("logits",))["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("backbone,opts,closed", [
    ("swin_tiny_patch4_window7_224", ["length=2", "deep=true"], 2 * (96 * 2 + 192 * 2 + 384 * 6 + 768 * 2)),
    ("test_resnet", ["location=pad", "length=2"], 3 * (2 * 2 * 36 + 32 * 4)),
])
def test_cli_trains_vpt_on_swin_and_pad_on_a_resnet(tmp_path, backbone, opts, closed):
    folder = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--backbone", backbone, "--img-size", "32", "--method", "vpt"]
    for o in opts:
        argv += ["-o", o]
    argv += ["--data", f"folder:{folder}", "--epochs", "1", "--batch-size", "8", "--lr", "0.1",
             "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tuned_params"] == closed


def test_pad_on_a_tf_port_whose_stem_is_conv2d_same():
    """EfficientNet-Lite0 (the zoo's tf_ port) pads 'same' in a Conv2d subclass: pad works, below refuses."""
    import timm

    from vistune import attach
    from vistune.errors import MethodError

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    tuned = attach(model, "vpt", num_classes=3, length=2, location="pad")
    with torch.no_grad():
        assert torch.isfinite(tuned.model(torch.randn(1, 3, 224, 224))).all()
    with pytest.raises(MethodError, match="plain nn.Conv2d stem"):
        attach(timm.create_model("tf_efficientnet_lite0", num_classes=0), "vpt", num_classes=3, length=2,
               location="below")
