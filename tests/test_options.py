"""Typed method options: one declaration (default, help, bounds) drives -o parsing, help and metadata;
and what a method declares about itself replaces tables keyed by method names."""

from __future__ import annotations

import dataclasses

import pytest

from vistune.cli import main
from vistune.errors import MethodError
from vistune.methods import get_method, method_names, parse_options
from vistune.methods.base import SearchSpace, option_table


@pytest.mark.parametrize("name", method_names())
def test_every_option_of_every_method_has_help(name):
    cls = get_method(name)
    for f in dataclasses.fields(cls.Options):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
    table = option_table(cls.Options)
    assert [r["name"] for r in table] == [f.name for f in dataclasses.fields(cls.Options)]


@pytest.mark.parametrize("method,key,value,message", [
    ("lora", "rank", "0", "rank must be >= 1, got 0"),
    ("lora", "dropout", "1", "dropout must be < 1, got 1.0"),
    ("lora", "targets", "q,x", "targets must be a non-empty subset"),
    ("vpt", "length", "0", "length must be >= 1, got 0"),
    ("adapter", "position", "middle", "position must be one of sequential, parallel, got 'middle'"),
    ("spt", "structured", "mlp", "structured must be one of lora, adapter, none"),
    ("protuning", "kernel", "4", "kernel must be a positive odd number, got 4"),  # cross rule: validate()
    ("protuning", "groups", "0", "groups must be >= 1, got 0"),
])
def test_declared_bounds_are_enforced_with_one_line(method, key, value, message):
    with pytest.raises(MethodError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_options(get_method(method), {key: value})


def test_values_inside_the_bounds_parse_to_the_declared_types():
    opts = parse_options(get_method("lora"), {"rank": "4", "targets": "q,k,v", "alpha": "none", "dropout": "0.1"})
    assert opts.rank == 4 and opts.targets == ("q", "k", "v") and opts.alpha is None and opts.dropout == 0.1


def test_info_help_lists_a_methods_options_from_the_declarations(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--method", "vpt", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "options of method vpt (-o KEY=VALUE):" in out
    assert "length (int, default 50; >= 1)" in out and "prompt tokens per layer" in out
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--method", "nope", "--help"])
    assert exit_.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err


def test_cli_method_help_comes_from_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tuning method: " + ", ".join(method_names()) in out


def test_capabilities_are_declared_on_each_method():
    formats = {n: get_method(n).formats for n in method_names()}
    assert formats["lora"] == ("timm", "onnx", "peft") and formats["vpt"] == ("onnx",)
    assert not get_method("linear").pretrainable and get_method("vpt").pretrainable
    for n in method_names():
        cls = get_method(n)
        assert isinstance(cls.search_space, SearchSpace) and cls.search_space.optimizer in ("sgd", "adamw")
        if "timm" not in cls.formats:
            assert not cls.mergeable and cls.not_mergeable_reason


def test_an_unmergeable_attachment_drops_timm_from_its_formats():
    import timm

    from vistune.tuning import attach

    lora = attach(timm.create_model("test_vit", img_size=32, num_classes=0), "lora", num_classes=3)
    assert lora.method.export_formats() == ("timm", "onnx", "peft")
    adapter = attach(timm.create_model("test_vit", img_size=32, num_classes=0), "adapter", num_classes=3)
    assert adapter.method.export_formats() == ("onnx",)
    spt = get_method("spt")()
    assert spt.export_formats() == ("timm", "onnx")
    spt.mergeable = False  # what SPT's attach sets when its allocation holds an adapter
    assert spt.export_formats() == ("onnx",)
