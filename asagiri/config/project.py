"""``project.yaml``: one file that describes a federation's parties, from which
``asagiri provision`` writes every party's startup kit (as NVFlare's ``nvflare provision``)."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import _Strict

__all__ = ["ProjectConfig", "ProjectCoordinator", "ProjectSite"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ProjectCoordinator(_Strict):
    # Where the sites reach the coordinator, and what it binds to (0.0.0.0: every interface).
    host: str = "127.0.0.1"
    port: int = Field(7740, ge=1, le=65535)
    listen_host: str | None = None  # default: host


class ProjectSite(_Strict):
    id: int = Field(ge=0, lt=1 << 31)
    name: str | None = None  # the institution, for the kit's README
    # Where the site's own data will be on its machine (written into its site.yaml; it may be
    # filled in there later). The site trains on the whole of it.
    data_path: str | None = None

    @field_validator("data_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # a relative path would be read from the kit's folder, on another machine: say which
        if value is not None and not PurePath(value).is_absolute():
            raise ValueError(f"{value!r} must be an absolute path: it is where the data is on that site's machine")
        return value


class ProjectConfig(_Strict):
    name: str = Field(min_length=1, max_length=64)  # the project, and the run id's default
    coordinator: ProjectCoordinator = ProjectCoordinator()
    # Anything fed.yaml takes, but the parts provisioning writes itself (sites, keys, listen).
    federation: dict[str, Any] = Field(default_factory=dict)
    sites: list[ProjectSite] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return v

    @field_validator("federation")
    @classmethod
    def _not_provisioned_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"sites", "identity_key", "listen"} & set(v))
        if taken:
            raise ValueError(f"{', '.join(taken)}: written by provisioning, not set here")
        return v

    @model_validator(mode="after")
    def _distinct_ids(self) -> ProjectConfig:
        ids = [s.id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ValueError("site ids must be distinct")
        return self
