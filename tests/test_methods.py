"""The parametrised matrix every method must pass (the spine's contract)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from vistune import TunedFileError, attach, create_backbone, load_tuned
from vistune.errors import MethodError, NotMergeableError

# (method, options): every registered method, with options that make them non-trivial.
CASES = [
    ("linear", {}),
    ("full", {}),
    ("bitfit", {}),
    ("vpt", {"length": 3}),
    ("vpt", {"length": 4, "deep": True}),
    ("lora", {"rank": 4}),
    ("lora", {"rank": 2, "targets": "q,k,v,proj,fc1,fc2", "alpha": 4}),
    ("adapter", {"bottleneck": 4}),
    ("adapter", {"bottleneck": 4, "position": "parallel", "scale": 0.5}),
]
IDS = [f"{m}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'default'}" for m, o in CASES]
MERGEABLE = {"linear", "full", "bitfit", "lora"}


def tiny_vit(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_backbone("vit_tiny_patch16_224", img_size=32, num_classes=5, **kw)


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def perturb(tuned) -> None:
    """Move every tuned tensor off its zero init, so equality tests are not trivially true."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.tuned_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_attach_at_init_equals_backbone(method, opts):
    if method == "vpt":
        pytest.skip("prompts are random tokens by design: VPT is not an identity at init")
    base = tiny_vit().eval()
    x = images()
    want = base(x)
    tuned = attach(copy.deepcopy(base), method, **opts).eval()
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=0)


def test_vpt_changes_sequence_only_through_prompts():
    """VPT with its prompts made inert (zero attention weight) would be identity; instead check
    the prompted forward equals a hand-built forward that inserts the same tokens."""
    base = tiny_vit().eval()
    tuned = attach(copy.deepcopy(base), "vpt", length=2, deep=True).eval()
    x = images()
    m = base
    h = m._pos_embed(m.patch_embed(x))
    prompts = tuned.model.vpt
    pre = m.num_prefix_tokens
    h = torch.cat([h[:, :pre], prompts.shallow.expand(len(x), -1, -1), h[:, pre:]], 1)
    for i, blk in enumerate(m.blocks):
        if i > 0:
            h = torch.cat([h[:, :pre], prompts.deep[i - 1].expand(len(x), -1, -1), h[:, pre + 2:]], 1)
        h = blk(h)
    h = torch.cat([h[:, :pre], h[:, pre + 2:]], 1)
    want = m.forward_head(m.norm(h))
    torch.testing.assert_close(tuned(x), want)


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_only_tuned_tensors_change(method, opts):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = attach(model, method, **opts)
    tuned_names = set(tuned.tuned_names())
    tuned.train()
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    after = tuned.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = changed - tuned_names
    assert not frozen_changed, f"frozen tensors changed: {sorted(frozen_changed)[:5]}"
    # something tuned moved (head at least), and the method's own tensors got gradients
    new_params = {n: p for n, p in tuned.model.named_parameters() if n not in before}
    assert changed or new_params
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.tuned_parameters(include_head=False)) \
        or method == "linear"
    # requires_grad is exactly the tuned set
    trainable = {n for n, p in tuned.model.named_parameters() if p.requires_grad}
    assert trainable == tuned_names


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_save_load_roundtrip(method, opts, tmp_path):
    tuned = attach(tiny_vit(), method, **opts).eval()
    perturb(tuned)
    x = images()
    want = tuned(x)
    path = tuned.save_tuned(tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tuned.tuned_state_dict())
    if method != "full":
        n_saved = sum(tuned.tuned_state_dict()[k].numel() for k in keys)
        assert n_saved == tuned.parameter_report()["trainable_params"]
    loaded = load_tuned(path, tiny_vit()).eval()
    torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    assert loaded.spec == tuned.spec


def test_load_refuses_other_backbone_weights(tmp_path):
    tuned = attach(tiny_vit(seed=0), "lora")
    path = tuned.save_tuned(tmp_path / "t.safetensors")
    with pytest.raises(TunedFileError, match="fingerprint"):
        load_tuned(path, tiny_vit(seed=1))


def test_load_refuses_other_architecture(tmp_path):
    tuned = attach(tiny_vit(), "vpt", length=2)
    path = tuned.save_tuned(tmp_path / "t.safetensors")
    other = create_backbone("test_vit", img_size=32, num_classes=5)
    with pytest.raises(TunedFileError, match="test_vit"):
        load_tuned(path, other)


def test_load_refuses_truncated_and_missing_file(tmp_path):
    tuned = attach(tiny_vit(), "adapter")
    path = tuned.save_tuned(tmp_path / "t.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TunedFileError, match="bad.safetensors"):
        load_tuned(bad, tiny_vit())
    with pytest.raises(TunedFileError, match="no such file"):
        load_tuned(tmp_path / "nope.safetensors", tiny_vit())


def test_save_is_atomic_no_temp_left(tmp_path):
    tuned = attach(tiny_vit(), "lora")
    tuned.save_tuned(tmp_path / "a.safetensors")
    tuned.save_tuned(tmp_path / "a.safetensors")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize("method,opts", CASES, ids=IDS)
def test_merge(method, opts):
    tuned = attach(tiny_vit(), method, **opts).eval()
    perturb(tuned)
    x = images()
    want = tuned(x)
    if method not in MERGEABLE:
        with pytest.raises(NotMergeableError, match=method):
            tuned.merge()
        return
    n_modules = len(list(tuned.model.modules()))
    tuned.merge()
    torch.testing.assert_close(tuned(x), want, rtol=1e-5, atol=1e-5)
    plain = tiny_vit()
    # the merged model is structurally the plain backbone: same modules, same parameter names
    assert [n for n, _ in tuned.model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert len(list(tuned.model.modules())) == len(list(plain.modules()))
    assert not tuned.model._forward_hooks and all(not m._forward_hooks for m in tuned.model.modules())
    with pytest.raises(TunedFileError, match="unmerge"):
        tuned.save_tuned("unused.safetensors")
    tuned.unmerge()
    assert len(list(tuned.model.modules())) == n_modules
    torch.testing.assert_close(tuned(x), want, rtol=1e-5, atol=1e-5)


def test_lora_fused_qkv_touches_only_chosen_thirds():
    tuned = attach(tiny_vit(), "lora", rank=2, targets="q,v").eval()
    perturb(tuned)
    qkv = tuned.model.blocks[0].attn.qkv
    w0 = qkv.weight.clone()
    tuned.merge()
    d = qkv.weight.shape[0] // 3
    diff = (qkv.weight - w0).abs().sum(dim=1)
    assert diff[:d].min() > 0 and diff[2 * d:].min() > 0
    assert torch.all(diff[d:2 * d] == 0)


def test_vpt_init_bound_and_geometry_with_register_tokens():
    model = create_backbone("vit_tiny_patch16_224", img_size=32, num_classes=3, reg_tokens=4)
    assert model.num_prefix_tokens == 5
    tuned = attach(model, "vpt", length=3, deep=True).eval()
    bound = (6 / (3 * 16 * 16 + 192)) ** 0.5
    for t in (tuned.model.vpt.shallow, tuned.model.vpt.deep):
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    assert tuned.model.vpt.deep.shape == (11, 3, 192)
    feats = tuned.model.forward_features(images())
    assert feats.shape[1] == 5 + 4  # prefix + 2x2 patches: prompts were stripped


def test_vpt_keeps_backbone_in_eval_mode_while_training():
    model = create_backbone("vit_tiny_patch16_224", img_size=32, num_classes=3, drop_rate=0.5, drop_path_rate=0.5)
    tuned = attach(model, "vpt", length=2, dropout=0.1).train()
    assert not tuned.model.blocks[0].training and not tuned.model.pos_drop.training
    assert tuned.model.vpt.dropout.training
    x = images()
    # no stochastic backbone layers active: two forwards with prompt dropout off agree
    tuned.model.vpt.dropout.eval()
    torch.testing.assert_close(tuned(x), tuned(x))
    full = attach(create_backbone("vit_tiny_patch16_224", img_size=32, num_classes=3, drop_path_rate=0.5), "full").train()
    assert full.model.blocks[0].training


@pytest.mark.parametrize(
    "method,opts,expected",
    [
        ("vpt", {"length": 50, "deep": True}, 460_800),
        ("vpt", {"length": 50}, 38_400),
        ("lora", {"rank": 8}, 294_912),
        ("adapter", {"bottleneck": 8}, 156_768),
        ("bitfit", {}, 102_912),
        ("linear", {}, 0),
    ],
)
def test_param_counts_vit_b16_closed_forms(method, opts, expected):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=100)
    report = attach(model, method, **opts).parameter_report()
    assert report["tuned_params"] == expected
    assert report["head_params"] == 768 * 100 + 100
    assert report["backbone_params"] == 85_798_656
    # closed forms from METHODS.md
    D, L = 768, 12
    closed = {
        ("vpt", True): L * 50 * D,
        ("vpt", False): 50 * D,
        ("lora", None): L * 2 * (D * 8 + 8 * D),
        ("adapter", None): L * (D * 8 + 8 + 8 * D + D),
    }
    key = (method, opts.get("deep", False)) if method == "vpt" else (method, None)
    if key in closed:
        assert closed[key] == expected


def test_bad_options_name_the_problem():
    with pytest.raises(MethodError, match="unknown method 'lorax'"):
        attach(tiny_vit(), "lorax")
    with pytest.raises(MethodError, match="no option 'ranks'"):
        attach(tiny_vit(), "lora", ranks=4)
    with pytest.raises(MethodError, match="rank=.abc"):
        attach(tiny_vit(), "lora", rank="abc")
    with pytest.raises(MethodError, match="targets"):
        attach(tiny_vit(), "lora", targets="q,zz")
    cnn = create_backbone("test_resnet", num_classes=3)
    with pytest.raises(MethodError, match="VisionTransformer"):
        attach(cnn, "vpt")


@pytest.mark.parametrize("method", ["linear", "bitfit", "full"])
def test_cnn_methods(method, tmp_path):
    """Methods that don't need tokens work on a CNN too, BatchNorm statistics frozen unless full."""
    model = create_backbone("test_resnet", num_classes=3)
    tuned = attach(model, method)
    bn = next(m for m in tuned.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    tuned.train()
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    torch.nn.functional.cross_entropy(tuned(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert torch.equal(bn.running_mean, stats) == (method != "full")
    tuned.eval()
    path = tuned.save_tuned(tmp_path / "c.safetensors")
    torch.manual_seed(0)
    loaded = load_tuned(path, create_backbone("test_resnet", num_classes=3)).eval()
    torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=0)


@pytest.mark.parametrize("method,opts", [("lora", {}), ("vpt", {"length": 2}), ("adapter", {}), ("bitfit", {}),
                                         ("protuning", {})])
def test_frozen_weights_stored_in_bf16_change_nothing_under_autocast(method, opts):
    """bf16 runs keep frozen Linear/Conv weights in bf16: autocast casts them to exactly that anyway."""
    import copy

    backbone = create_backbone("test_vit", img_size=32)
    a = attach(copy.deepcopy(backbone), method, num_classes=3, **opts)
    b = attach(copy.deepcopy(backbone), method, num_classes=3, **opts)
    b.load_state_dict(a.state_dict())
    assert b.cast_frozen_matmul_weights() > 0
    assert all(p.dtype == torch.float32 for p in b.tuned_parameters())  # the optimizer's copies stay fp32
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a(x), b(x))
