"""Loading ``fed.yaml`` and ``site.yaml``: ``--set`` overrides, one readable error per problem
(:class:`~asagiri.config.ConfigError`), relative paths taken from the file's folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .base import ConfigError
from .federation import FederationConfig
from .project import ProjectConfig
from .site import SiteConfig

__all__ = ["apply_overrides", "config_digest", "default_federation", "load_federation", "load_project", "load_site",
           "validated"]

_M = TypeVar("_M", bound=BaseModel)


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars: ``3``, ``0.5``, ``true``, ``fedprox``, ``null``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], *, source: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to raw config data, before validation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item}: empty key")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: --set {key}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return data


def validated(model: type[_M], data: Any, source: str) -> _M:
    """``model`` from ``data`` (not read from a file: built by provisioning, say), or a
    :class:`ConfigError` naming ``source``, the key and the reason."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def _format_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = f" (got {value!r})" if loc and not isinstance(value, dict | list) and value is not None else ""
        lines.append(f"{source}: {loc + ': ' if loc else ''}{msg}{shown}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None or p.is_absolute():
        return p
    return base / p


def _load(model: type[_M], path: Path, overrides: list[str] | None) -> _M:
    data = apply_overrides(_read_yaml(path), overrides or [], source=path.name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(path.name, exc)) from None


def load_federation(path: Path, overrides: list[str] | None = None) -> FederationConfig:
    """Load and validate ``fed.yaml``; relative paths are taken from the file's folder."""
    cfg = _load(FederationConfig, path, overrides)
    base = path.parent
    cfg = cfg.model_copy(
        update={"identity_key": _resolve(base, cfg.identity_key), "run_dir": _resolve(base, cfg.run_dir)}
    )
    if cfg.data.path is not None:
        cfg.data.path = _resolve(base, cfg.data.path)
    return cfg


def config_digest(cfg: BaseModel) -> str:
    """SHA-256 of a config's canonical JSON (keys sorted): what the audit log records."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_federation(overrides: list[str] | None = None) -> FederationConfig:
    """The defaults, with ``key.path=value`` overrides: a federation config without a file."""
    try:
        return FederationConfig.model_validate(apply_overrides({}, overrides or [], source="--set"))
    except ValidationError as exc:
        raise ConfigError(_format_error("--set", exc)) from None


def load_project(path: Path) -> ProjectConfig:
    """Load and validate ``project.yaml`` (``asagiri provision``)."""
    return _load(ProjectConfig, path, None)


def load_site(path: Path, overrides: list[str] | None = None) -> SiteConfig:
    """Load and validate a site's file; relative paths are taken from the file's folder."""
    cfg = _load(SiteConfig, path, overrides)
    base = path.parent
    return cfg.model_copy(
        update={
            "identity_key": _resolve(base, cfg.identity_key),
            "state_dir": _resolve(base, cfg.state_dir),
            "data_path": _resolve(base, cfg.data_path),
        }
    )
