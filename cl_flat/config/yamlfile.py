"""The one reader of YAML files (run configs, a run folder's config.yaml): UTF-8 text (a BOM accepted),
no key given twice in a mapping (the second would silently win), and a bounded size once aliases are
expanded (a "billion laughs" document would keep validation busy for minutes). Every problem is one
line naming the file (and line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 100_000  # nodes of the document with every alias expanded; a config has a few hundred


class YamlProblem(Exception):
    """One line naming the file (file:line) and what is wrong."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes under `node` counting each alias's target again (memoised: linear in the document)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias counts once
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in _children(node))
    return sizes[id(node)]


class _Loader(yaml.SafeLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, {}) > MAX_NODES:
            raise YamlProblem(f"more than {MAX_NODES} values once its aliases (*name) are expanded; "
                              "refusing to expand it")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise YamlProblem(f"{line}: key {key_node.value!r} is given twice (lines {seen[key_node.value]} "
                                      f"and {line}); the second would silently replace the first")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep)


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise YamlProblem(f"{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a YamlProblem ("path:line: what") if it cannot be read."""
    try:
        return yaml.load(_text(path), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except YamlProblem as exc:
        where = f"{path}:" if str(exc)[:1].isdigit() else f"{path}: "
        raise YamlProblem(where + str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise YamlProblem(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise YamlProblem(f"{path}: not valid YAML (nested too deeply)") from None
    except OSError as exc:
        raise YamlProblem(f"{path}: cannot read ({exc.strerror or exc})") from None
