"""The registry of pluggable parts: registry ⇔ config union ⇔ `cl-flat methods`, parts found without an
import list, outside parts through entry points, and one message for each way a part can be broken."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Literal, get_args

import pytest

from cl_flat.config import Strict, flatness_adapter, validate_config
from cl_flat.errors import PluginError
from cl_flat.flatness import describe_methods
from cl_flat.registry import METHODS, Registry

BUILT_IN = {"none", "sam", "rwp", "lpf_sgd", "flat_lora"}


def _union_tags(registry: Registry) -> set[str]:
    union = get_args(registry.config_union())[0]
    return {get_args(member.model_fields[registry.tag].annotation)[0] for member in get_args(union)}


def test_registry_union_and_methods_listing_agree():
    names = set(METHODS.names())
    assert BUILT_IN <= names
    assert _union_tags(METHODS) == names
    assert {m["method"] for m in describe_methods()} == names
    for name in names:  # every registered method is accepted by the run config, as its own config class
        config = validate_config({"model": {"name_or_path": "tiny-random:llama"},
                                  "tasks": [{"name": "a", "source": "builtin", "flatness": {"method": name}}],
                                  "flatness": {"method": name}})
        assert type(config.flatness) is METHODS.get(name).config_class
        assert type(config.tasks[0].flatness) is METHODS.get(name).config_class
        assert type(flatness_adapter().validate_python({"method": name})) is METHODS.get(name).config_class


def test_built_in_methods_come_from_their_own_files():
    for name in BUILT_IN:
        entry = METHODS.get(name)
        assert entry.source == f"cl_flat.flatness.{name}" == entry.cls.__module__ == entry.config_class.__module__


def test_a_config_class_must_carry_its_name_as_the_tag():
    class Wrong(Strict):
        method: Literal["other"]

    with pytest.raises(PluginError, match=r"Wrong must declare `method: Literal\['mine'\]`"):
        METHODS.register("mine", Wrong)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(PluginError, match="unknown flatness method 'magic'; expected one of .*'sam'"):
        METHODS.get("magic")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh registry over a package `parts` of two modules, no import list anywhere."""
    root = tmp_path / "parts"
    root.mkdir()
    (root / "__init__.py").write_text("")
    registry = Registry("widget", package="parts", group="test.widgets", tag="kind", decorator="WIDGETS.register")
    monkeypatch.setattr("cl_flat.registry.entry_points", lambda group: [])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "widgets_registry", type("M", (), {"WIDGETS": registry}))
    for name in ("alpha", "beta"):
        (root / f"{name}.py").write_text(
            "from typing import Literal\nfrom cl_flat.config import Strict\nfrom widgets_registry import WIDGETS\n\n"
            f"class Config(Strict):\n    kind: Literal['{name}']\n    size: int = 1\n\n"
            f"@WIDGETS.register('{name}', Config)\nclass Part:\n    pass\n")
    yield registry, tmp_path
    for module in ("parts", "parts.alpha", "parts.beta", "outside_part", "empty_part", "broken_part"):
        __import__("sys").modules.pop(module, None)


def test_the_package_modules_are_found_without_an_import_list(package):
    registry, _ = package
    assert sorted(registry.names()) == ["alpha", "beta"]
    assert _union_tags(registry) == {"alpha", "beta"}
    from pydantic import TypeAdapter

    value = TypeAdapter(registry.config_union()).validate_python({"kind": "beta", "size": 3})
    assert type(value).__module__ == "parts.beta" and value.size == 3


def _entry_point(monkeypatch, value: str):
    point = EntryPoint(name="outside", value=value, group="test.widgets")
    monkeypatch.setattr("cl_flat.registry.entry_points", lambda group: [point] if group == "test.widgets" else [])


def test_an_entry_point_adds_an_outside_part(package, monkeypatch):
    registry, root = package
    (root / "outside_part.py").write_text(
        "from typing import Literal\nfrom cl_flat.config import Strict\nfrom widgets_registry import WIDGETS\n\n"
        "class Config(Strict):\n    kind: Literal['gamma']\n\n"
        "@WIDGETS.register('gamma', Config)\nclass Gamma:\n    pass\n")
    _entry_point(monkeypatch, "outside_part:Gamma")
    assert sorted(registry.names()) == ["alpha", "beta", "gamma"]
    assert "entry point test.widgets: outside = outside_part:Gamma" in registry.get("gamma").source


def test_a_duplicate_name_names_both_sources(package, monkeypatch):
    registry, root = package
    (root / "outside_part.py").write_text(
        "from typing import Literal\nfrom cl_flat.config import Strict\nfrom widgets_registry import WIDGETS\n\n"
        "class Config(Strict):\n    kind: Literal['alpha']\n\n"
        "@WIDGETS.register('alpha', Config)\nclass Impostor:\n    pass\n")
    _entry_point(monkeypatch, "outside_part")
    with pytest.raises(PluginError) as caught:
        registry.load()
    message = str(caught.value)
    assert "widget 'alpha' is registered twice: by parts.alpha (Part) and by" in message
    assert "entry point test.widgets: outside = outside_part" in message and "(Impostor)" in message
    with pytest.raises(PluginError):  # refused every time it is asked, not only the first
        registry.names()


@pytest.mark.parametrize(("body", "expected"), [
    ("raise ImportError('needs torch_xla')", "failed to load: ImportError: needs torch_xla"),
    ("X = 1", "registered nothing: decorate its class with @WIDGETS.register(name, ConfigClass)"),
])
def test_a_broken_entry_point_is_one_message(package, monkeypatch, body, expected):
    registry, root = package
    (root / "broken_part.py").write_text(body + "\n")
    _entry_point(monkeypatch, "broken_part")
    with pytest.raises(PluginError, match="widget plugin") as caught:
        registry.load()
    assert expected in str(caught.value) and "broken_part" in str(caught.value)
