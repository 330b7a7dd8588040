"""Pro-tuning: stage-wise, input-dependent prompt blocks on CNNs and ViTs (issue 7).

Every forward check compares against a hand-built forward that applies ``F + g(F)`` at the
stages the design documents, so a hook on the wrong module, a skipped stage, a transposed
token grid or a touched CLS/register token fails here.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import vistune.cifar_resnet  # noqa: F401  (registers resnet*_cifar with timm)
from vistune import attach, create_backbone, load_tuned
from vistune.errors import MethodError, NotMergeableError
from vistune.methods.protuning import PromptBlock, stage_modules


def images(n: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def perturb(tuned, scale: float = 0.1) -> None:
    """Move every tuned tensor off its init (the expand convs start at zero)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.tuned_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def block_formula(c: int, rho: int, k: int) -> int:
    """One prompt block, h = max(1, C // ρ): reduce (C·h + h) + depthwise (h·k² + h) + expand (h·C + C)."""
    h = max(1, c // rho)
    return (c * h + h) + (h * k * k + h) + (h * c + c)


def vit(arch: str = "test_vit", **kw) -> torch.nn.Module:
    """timm's ``test_vit``: 6 blocks of width 64, CLS-token pooling; fast enough for every test."""
    torch.manual_seed(0)
    kw.setdefault("img_size", 32)
    if isinstance(kw["img_size"], tuple):  # create_backbone records an int image size
        return timm.create_model(arch, num_classes=3, **kw)
    return create_backbone(arch, num_classes=3, **kw)


# -- identity at init, on every family the issue names ------------------------------------

# (arch, the feature modules prompted by default): the default is the last four levels.
DEFAULT_STAGES = [
    ("test_resnet", ["layer1", "layer2", "layer3", "layer4"]),
    ("test_convnext", ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ("test_efficientnet", ["blocks.1", "blocks.2", "blocks.3", "blocks.4"]),
    ("tf_efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("mobilenetv2_100", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
    ("resnet20_cifar", ["layer1", "layer2", "layer3"]),
]


@pytest.mark.parametrize("arch,modules", DEFAULT_STAGES, ids=[a for a, _ in DEFAULT_STAGES])
def test_cnn_attach_is_identity_at_init_and_prompts_default_stages(arch, modules):
    torch.manual_seed(0)
    base = create_backbone(arch, num_classes=4).eval()
    x = images()
    want = base(x)
    tuned = attach(copy.deepcopy(base), "protuning").eval()
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=0)
    # the blocks sit on the documented modules, with their channel counts
    levels = stage_modules(base)
    chosen = [levels[s] for s in tuned.spec.options["stages"]]
    assert [lv.name for lv in chosen] == modules
    for s, lv in zip(tuned.spec.options["stages"], chosen):
        assert tuned.model.protuning[f"stage{s}"].channels == lv.channels
    # the hooks are live: once the blocks are non-zero the output moves
    perturb(tuned)
    assert not torch.allclose(tuned(x), want)


def test_vit_attach_is_identity_at_init():
    base = vit(reg_tokens=2).eval()
    x = images()
    want = base(x)
    tuned = attach(copy.deepcopy(base), "protuning").eval()
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=0)
    assert tuned.spec.options["groups"] == 4 and tuned.spec.options["stages"] == [0, 1, 2, 3]
    perturb(tuned)
    assert not torch.allclose(tuned(x), want)


def test_prompt_block_is_the_documented_composition():
    block = PromptBlock(32, reduction=4, kernel=5)
    assert torch.count_nonzero(block.expand.weight) == 0 and torch.count_nonzero(block.expand.bias) == 0
    assert torch.count_nonzero(block.reduce.weight) > 0 and torch.count_nonzero(block.dw.weight) > 0
    with torch.no_grad():
        block.expand.weight.normal_()
        block.expand.bias.normal_()
    x = torch.randn(2, 32, 7, 9)
    h = F.conv2d(x, block.reduce.weight, block.reduce.bias)  # 1x1, 32 → 8
    h = F.conv2d(h, block.dw.weight, block.dw.bias, padding=2, groups=8)  # 5x5 depthwise
    want = F.conv2d(F.gelu(h), block.expand.weight, block.expand.bias)  # 1x1, 8 → 32
    assert block.dw.weight.shape == (8, 1, 5, 5)
    torch.testing.assert_close(block(x), want)


# -- the hooks compute F_s + g_s(F_s) at exactly the chosen stages -------------------------


@pytest.mark.parametrize("stages", [None, (0, 2)], ids=["default", "act1-and-layer2"])
def test_resnet_forward_equals_hand_built_prompted_forward(stages):
    torch.manual_seed(0)
    base = create_backbone("test_resnet", num_classes=4).eval()
    opts = {} if stages is None else {"stages": ",".join(map(str, stages))}
    tuned = attach(copy.deepcopy(base), "protuning", **opts).eval()
    perturb(tuned)
    g = tuned.model.protuning
    chosen = set(stages or (1, 2, 3, 4))
    assert set(g.keys()) == {f"stage{s}" for s in chosen}

    def prompt(s: int, h: torch.Tensor) -> torch.Tensor:
        return h + g[f"stage{s}"](h) if s in chosen else h

    x = images()
    m = base
    h = prompt(0, m.act1(m.bn1(m.conv1(x))))  # feature level 0 is the stem's act1
    h = m.maxpool(h)
    for s, layer in enumerate([m.layer1, m.layer2, m.layer3, m.layer4], start=1):
        h = prompt(s, layer(h))
    torch.testing.assert_close(tuned(x), tuned.model.forward_head(h), rtol=1e-5, atol=1e-6)


def vit_reference(base, tuned, x, starts: dict[int, str]) -> torch.Tensor:
    """ViT forward that prompts the patch tokens entering the given block indices."""
    m, blocks = base, tuned.model.protuning
    h = m.patch_embed(x)
    gh, gw = (h.shape[1], h.shape[2]) if h.ndim == 4 else m.patch_embed.grid_size
    h = m.norm_pre(m.patch_drop(m._pos_embed(h)))
    pre = m.num_prefix_tokens
    for i, blk in enumerate(m.blocks):
        if i in starts:
            patches = h[:, pre:]
            fmap = patches.unflatten(1, (gh, gw)).permute(0, 3, 1, 2)  # (B, D, H, W), row-major
            p = blocks[starts[i]](fmap).permute(0, 2, 3, 1).flatten(1, 2)
            h = torch.cat([h[:, :pre], patches + p], dim=1)
        h = blk(h)
    return tuned.model.forward_head(m.norm(h))


# test_vit's 6 blocks in 4 groups: sizes 2,2,1,1, starting at blocks 0, 2, 4, 5
DEFAULT_STARTS = {0: "group0", 2: "group1", 4: "group2", 5: "group3"}


@pytest.mark.parametrize(
    "opts,starts",
    [
        ({}, DEFAULT_STARTS),
        # 6 blocks in 3 groups: sizes 2,2,2, so groups 1 and 2 start at blocks 2 and 4
        ({"groups": 3, "stages": "1,2"}, {2: "group1", 4: "group2"}),
    ],
    ids=["4-groups", "3-groups-stages-1-2"],
)
def test_vit_forward_equals_hand_built_on_a_non_square_grid(opts, starts):
    # 2x4 patch grid: a transposed reshape would mix the depthwise conv's neighbours
    base = vit(img_size=(32, 64), reg_tokens=2).eval()
    tuned = attach(copy.deepcopy(base), "protuning", **opts).eval()
    perturb(tuned)
    assert set(tuned.model.protuning.keys()) == set(starts.values())
    x = images(h=32, w=64)
    torch.testing.assert_close(tuned(x), vit_reference(base, tuned, x, starts), rtol=1e-5, atol=1e-5)


def test_vit_dynamic_img_size_uses_the_inputs_grid():
    base = vit(dynamic_img_size=True).eval()
    tuned = attach(copy.deepcopy(base), "protuning").eval()
    x = images(h=48, w=32)  # 3x2 grid, not the 2x2 the model was built for
    torch.testing.assert_close(tuned(x), base(x), rtol=0, atol=0)
    perturb(tuned)
    torch.testing.assert_close(tuned(x), vit_reference(base, tuned, x, DEFAULT_STARTS), rtol=1e-5, atol=1e-5)


def test_vit_prefix_and_register_tokens_pass_through_untouched():
    model = vit("vit_tiny_patch16_224", reg_tokens=4)
    assert model.num_prefix_tokens == 5
    tuned = attach(model, "protuning").eval()
    perturb(tuned, scale=0.5)
    m = tuned.model
    starts = [0, 3, 6, 9]
    # what reaches each group's first block un-prompted (the embedded tokens, or the previous
    # block's output) and what the block actually receives, seen by pre-hooks registered after
    # Pro-tuning's, so they see its prompted tokens
    plain: dict[int, torch.Tensor] = {}
    received: dict[int, torch.Tensor] = {}
    handles = [m.norm_pre.register_forward_hook(lambda mod, a, out: plain.__setitem__(0, out))]
    for i in starts:
        handles.append(m.blocks[i].register_forward_pre_hook(
            lambda mod, a, i=i: received.__setitem__(i, a[0])))
        if i > 0:
            handles.append(m.blocks[i - 1].register_forward_hook(
                lambda mod, a, out, i=i: plain.__setitem__(i, out)))
    with torch.no_grad():
        tuned(images())
    for h in handles:
        h.remove()
    for i in starts:
        assert torch.equal(received[i][:, :5], plain[i][:, :5]), f"prefix tokens changed before block {i}"
        assert not torch.allclose(received[i][:, 5:], plain[i][:, 5:]), f"no prompt before block {i}"


# -- training touches only the prompt blocks and the head; BatchNorm stays frozen ----------


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_training_changes_only_prompt_blocks_and_head(arch):
    torch.manual_seed(0)
    kw = {"img_size": 32} if arch == "test_vit" else {}
    model = create_backbone(arch, num_classes=4, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = attach(model, "protuning")
    tuned.train()
    bns = [m for m in tuned.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert (len(bns) > 0) == (arch != "test_vit")
    assert all(not bn.training for bn in bns), "BatchNorm must stay in eval mode"
    assert all(m.training for m in tuned.model.protuning.modules())
    head_ids = {id(p) for p in tuned.head_parameters()}
    head = {n for n, p in tuned.model.named_parameters() if id(p) in head_ids}
    names = {n for n, _ in tuned.model.named_parameters() if n.startswith("protuning.")}
    assert set(tuned.tuned_names()) == names | head
    assert {n for n, p in tuned.model.named_parameters() if p.requires_grad} == names | head

    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):  # step 1 moves the zero expand convs; later steps reach reduce/depthwise
        opt.zero_grad()
        F.cross_entropy(tuned(x), y).backward()
        opt.step()
    after = tuned.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= head, f"frozen tensors changed: {sorted(changed - head)[:5]}"
    assert changed == head
    stats = [k for k in before if "running_" in k or "num_batches" in k]
    assert (len(stats) > 0) == (arch != "test_vit")  # and none of them changed (checked above)
    # every prompt tensor (reduce, depthwise, expand) is in the graph and gets a gradient
    for n, p in tuned.model.protuning.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"


# -- files and counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kw,opts",
    [
        ("test_resnet", {}, {"stages": "0,3", "reduction": 4, "kernel": 5}),
        ("resnet20_cifar", {}, {}),
        ("test_vit", {"img_size": 32, "reg_tokens": 4}, {"groups": 3}),
    ],
    ids=["test_resnet", "resnet20_cifar", "test_vit"],
)
def test_save_load_on_fresh_backbone_gives_identical_logits(arch, kw, opts, tmp_path):
    def fresh():
        torch.manual_seed(0)
        return create_backbone(arch, num_classes=4, **kw)

    tuned = attach(fresh(), "protuning", **opts).eval()
    perturb(tuned)
    x = images()
    want = tuned(x)
    path = tuned.save_tuned(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        spec = json.loads(f.metadata()["vistune"])["method"]
    head = set(tuned.tuned_names()) - set(tuned.tuned_names(include_head=False))
    assert {k for k in keys if not k.startswith("protuning.")} == head
    assert sum(tuned.tuned_state_dict()[k].numel() for k in keys) == tuned.parameter_report()["trainable_params"]
    assert spec["options"]["stages"] == tuned.spec.options["stages"] != []  # resolved, not "default"
    loaded = load_tuned(path, fresh()).eval()
    assert loaded.spec == tuned.spec
    torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


def test_param_count_closed_form_test_resnet():
    model = create_backbone("test_resnet", num_classes=4)
    report = attach(model, "protuning", stages="0,3", reduction=4, kernel=5).parameter_report()
    # feature levels 0 (act1, 32 ch) and 3 (layer3, 192 ch); ρ=4, k=5:
    # 32·8+8 + 8·25+8 + 8·32+32 = 760 ; 192·48+48 + 48·25+48 + 48·192+192 = 19_920
    assert block_formula(32, 4, 5) == 760 and block_formula(192, 4, 5) == 19_920
    assert report["tuned_params"] == 760 + 19_920
    assert report["head_params"] == 96 * 4 + 4 and not report["mergeable"]


@pytest.mark.parametrize(
    "arch,channels,groups_d,expected",
    [
        ("tf_efficientnet_lite0", (24, 40, 112, 320), None, 30_458),
        ("mobilenetv2_100", (24, 32, 96, 320), None, 29_425),
        ("vit_small_patch14_dinov2", None, (4, 384), 151_104),
        ("vit_base_patch16_224", None, (4, 768), 597_120),
    ],
)
def test_default_param_counts_on_meta_device(arch, channels, groups_d, expected, capsys):
    """Counts as ``vistune info`` reports them, built on the meta device (no memory, no weights)."""
    from vistune.cli import main

    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=10)
    report = attach(model, "protuning").parameter_report()
    closed = (sum(block_formula(c, 8, 3) for c in channels) if channels
              else groups_d[0] * block_formula(groups_d[1], 8, 3))
    assert report["tuned_params"] == closed == expected
    assert main(["info", "--backbone", arch, "--method", "protuning", "--num-classes", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tuned_params"] == expected


# -- errors --------------------------------------------------------------------------------


def test_bad_options_name_the_value():
    cnn = lambda: create_backbone("test_resnet", num_classes=3)  # noqa: E731
    with pytest.raises(MethodError, match=r"stage 7 is out of range.*act1, layer1.*0 to 4"):
        attach(cnn(), "protuning", stages="1,7")
    with pytest.raises(MethodError, match=r"stage 4 is out of range.*groups=4"):
        attach(vit(), "protuning", stages=(0, 4))
    with pytest.raises(MethodError, match="groups=7 must be between 1 and the depth"):
        attach(vit(), "protuning", groups=7)
    with pytest.raises(MethodError, match="groups=2 applies to ViTs only"):
        attach(cnn(), "protuning", groups=2)
    with pytest.raises(MethodError, match="kernel must be a positive odd number, got 4"):
        attach(cnn(), "protuning", kernel=4)
    with pytest.raises(MethodError, match="non-negative.*-1"):
        attach(cnn(), "protuning", stages="-1")
    with pytest.raises(MethodError, match="repeated"):
        attach(cnn(), "protuning", stages="2,2")
    with pytest.raises(MethodError, match="stages=.*x"):
        attach(cnn(), "protuning", stages="1,x")


def test_merge_is_refused_and_says_why():
    tuned = attach(create_backbone("test_resnet", num_classes=3), "protuning")
    with pytest.raises(NotMergeableError, match="protuning.*input-dependent"):
        tuned.merge()
    assert not tuned.method.merged
