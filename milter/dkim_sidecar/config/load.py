"""Reading a config file: YAML (duplicate keys refused) to plain data, then parse.py."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from .convert import _show
from .model import Config, ConfigError
from .parse import parse_config


def load_config(path: str | None, env: Mapping[str, str] = os.environ) -> Config:
    """Read and validate a YAML config file, then apply environment overrides.

    `path` None gives the built-in defaults (plus environment overrides). Raises ConfigError.
    """
    if path is None:
        return parse_config({}, "<defaults>", env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte offset {e.start})"]) from None
    problems: list[str] = []
    data = _load_yaml(text, path, problems)
    if problems and data is None:
        raise ConfigError(problems)
    try:
        config = parse_config(data, path, env)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return config


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also records duplicate keys (plain YAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str, problems: list[str]) -> object:
    """Parse YAML safely; syntax errors and duplicate keys go to `problems` with their line."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        problems.append(f"{where}: YAML syntax error: {what or e}")
        return None
    except yaml.YAMLError as e:
        problems.append(f"{source}: YAML error: {e}")
        return None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        problems.append(f"{source}: line {line}: duplicate key {_show(key)} (only one may be set)")
    return data
