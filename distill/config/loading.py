"""Reading a config: YAML + dotted overrides, validated, with errors phrased for the user.

    from distill.config import load_config
    cfg = load_config("configs/default.yaml", ["generation.sampling.max_tokens=32"])

Unknown keys, wrong types and out-of-range values are rejected here, before any Ray work, with
the dotted path of the field and a hint (see `ConfigError`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill.config.models import RunConfig
from distill.errors import UserError


class ConfigError(UserError):
    """A config problem, phrased for the user: the field's dotted path, what is wrong, a fix."""


def union_members(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes a field annotation can hold (unwrapping Annotated / Union / Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    members: list[type[BaseModel]] = []
    if hasattr(annotation, "__metadata__"):  # Annotated[Union[...], Field(...)]
        return union_members(annotation.__origin__)
    for arg in getattr(annotation, "__args__", ()):
        members += union_members(arg)
    return members


def _walk(loc: tuple) -> tuple[list[str], list[type[BaseModel]]]:
    """Follow an error location through the models: (user-facing key path, models at its end).
    Discriminated-union tags that pydantic puts in the location are resolved and dropped."""
    path: list[str] = []
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc:
        part = str(part)
        field_models = [m for m in models if part in m.model_fields]
        if field_models:
            path.append(part)
            models = union_members(field_models[0].model_fields[part].annotation)
            continue
        by_tag = [m for m in models
                  if "kind" in m.model_fields and f"'{part}'" in str(m.model_fields["kind"].annotation)]
        if by_tag:
            models = by_tag
            continue
        path.append(part)
        models = []
    return path, models


def _hint(err: dict[str, Any], models: list[type[BaseModel]], key: str) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = sorted({f for m in models for f in m.model_fields})
        close = difflib.get_close_matches(key, valid, n=1)
        did_you_mean = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key; {did_you_mean}valid keys here: {', '.join(valid)}"
    if kind == "union_tag_invalid":
        return f"{err['msg']}; set `kind` to one of the listed values"
    return f"{err['msg']} (got {err.get('input')!r})"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        parent_path, parent_models = _walk(loc[:-1]) if loc else ([], [RunConfig])
        path, _ = _walk(loc)
        key = str(loc[-1]) if loc else ""
        lines.append(f"  {'.'.join(path) or '<root>'}: {_hint(err, parent_models, key)}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are parsed as YAML (numbers, booleans, lists)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. training.epochs=2)")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
    return tree


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], source: str) -> RunConfig:
    """`cfg` with `{dotted.key: value}` applied and validated (a ConfigError names `source`)."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        node = tree
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(_merge(cfg.model_dump(mode="json"), tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a YAML file (e.g. configs/default.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}:{line} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = read_yaml(path, "config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
