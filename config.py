"""YAML configs: safe loading, typed ``--set key=value`` overrides, validation against a schema.

A schema is a plain dict mapping every valid key to its default value. The default's type is the
expected type (an int is accepted where a float is expected); a default of ``None`` accepts any
value; a nested dict is a nested schema. Keeping the schema as "defaults" means one table says both
what a key means by default and what type it must have.
"""

from __future__ import annotations

import copy
import difflib
import io
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, key and problem."""


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    return yaml


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping. A top-level ``extends: other.yaml`` (relative to this file) starts from that file: its keys,
    with this file's merged over them (mappings key by key, other values replaced)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as f:
            data = _yaml().load(f)
    except YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: extends must name one YAML file, got {base!r}")
    parent = (path.parent / base).resolve()
    if parent in _seen:
        raise ConfigError(f"config file {path}: extends {base} loops back to itself")
    return _merged(load_yaml(parent, (*_seen, path.resolve())), data)


def _merged(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        )
    return out


def dump_yaml(config: Mapping, path: str | Path | None = None) -> str:
    buf = io.StringIO()
    _yaml().dump(_plain(config), buf)
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, float):
        return "float"
    if isinstance(default, int):
        return "int"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)):
        return "list"
    if isinstance(default, dict):
        return "mapping"
    return type(default).__name__


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def _unknown_key(key: str, valid: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def validate(config: Mapping, schema: Mapping, source: str = "", prefix: str = "") -> dict:
    """Fill defaults and check every key and type. Returns a new dict; raises ConfigError."""
    where = f" in {source}" if source else ""
    out = copy.deepcopy(dict(schema))
    for key, value in config.items():
        full = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key(full, schema.keys(), where)
        default = schema[key]
        if isinstance(default, dict) and default and isinstance(value, dict):
            out[key] = validate(value, default, source, prefix=f"{full}.")
            continue
        if not _type_ok(value, default):
            raise ConfigError(
                f"config key '{full}'{where} expects {_type_name(default)}, got {type(value).__name__} {value!r}"
            )
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        out[key] = copy.deepcopy(value)
    return out


def check_values(config: Mapping, checks: Mapping[str, tuple[Callable[[Any], bool], str]], source: str = "") -> None:
    """Every ``key -> (test, wanted)`` of ``checks`` holds for ``config[key]`` (absent or None is skipped); else a
    ConfigError naming the key, the value, what it must be and where the config came from."""
    where = f" (from {source} and the command line)" if source else ""
    for key, (test, wanted) in checks.items():
        value = config.get(key)
        if value is not None and not test(value):
            raise ConfigError(f"config key '{key}'{where} must be {wanted}, got {value!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key.sub, YAML-typed value); ``lr=1e-5`` gives a float, ``x=[1,2]`` a list."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = _yaml().load(raw) if raw.strip() else ""
    except YAMLError:
        value = raw
    # YAML 1.2 reads "1e-5" as a string; a number is what anyone writing it means.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key, value


def set_key(config: dict, key: str, value: Any, schema: Mapping | None = None, origin: str = "") -> None:
    """Set the dotted ``key`` of ``config`` in place. With ``schema`` the key must exist there and the value
    must have its type; errors name ``origin`` (e.g. ``--set lr=x``), not the config file."""
    where = f" (from {origin})" if origin else ""
    parts = key.split(".")
    node, spec = config, schema
    for i, part in enumerate(parts):
        if spec is not None:
            if not isinstance(spec, Mapping) or part not in spec:
                valid = spec.keys() if isinstance(spec, Mapping) else []
                raise _unknown_key(key, valid, where)
            spec = spec[part]
        if i < len(parts) - 1:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin or key}: '{'.'.join(parts[: i + 1])}' is not a mapping")
            continue
        if spec is not None:
            if isinstance(spec, dict) and spec and isinstance(value, dict):
                value = validate(value, spec, origin, prefix=f"{key}.")
            elif not _type_ok(value, spec):
                raise ConfigError(
                    f"config key '{key}'{where} expects {_type_name(spec)}, got {type(value).__name__} {value!r}"
                )
        node[part] = value


def apply_overrides(config: dict, overrides: Iterable[str], schema: Mapping | None = None) -> dict:
    """Apply ``--set`` overrides in order; keys and value types are checked against ``schema`` when given."""
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, value = parse_override(item)
        set_key(config, key, value, schema, f"--set {item}")
    return config


def load_config(
    path: str | Path | None, schema: Mapping, overrides: Iterable[str] = (), flags: Mapping | None = None
) -> dict:
    """Read ``path`` (optional), patch with ``overrides`` (``--set``) then ``flags`` (dedicated command-line
    flags such as ``--pretrained``, which are the more specific: dotted key -> typed value), validate
    against ``schema``."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides, schema)
    for key, value in (flags or {}).items():
        set_key(raw, key, value, schema, f"a command-line flag for {key}")
    return validate(raw, schema, source=str(path) if path is not None else "")
