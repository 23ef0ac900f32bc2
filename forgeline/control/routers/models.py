"""Registered models and their versions (read-only; any valid key of the owning org)."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Depends, Request

from forgeline.control.auth import caller, owns_version, visible_models
from forgeline.control.protocol import ApprovalOut, ModelList, VersionDetailOut, VersionList, VersionOut
from registry import lineage
from registry.client import Registry
from registry.decisions import lifecycle_state
from registry.keys import KeyRecord
from registry.refs import VersionNumber

router = APIRouter(prefix="/v1/models", tags=["models"])


def registry_of(request: Request) -> Registry:
    """The app's registry."""
    return cast(Registry, request.app.state.registry)


@router.get("")
def list_models(request: Request, key: KeyRecord = Depends(caller)) -> ModelList:
    """Names of the registered models this key may see: its org's (untagged ones are the
    operator's `default` org's), matching its pattern."""
    return ModelList(models=visible_models(key, registry_of(request).model_orgs()))


@router.get("/{name}/versions")
def list_versions(name: str, request: Request, key: KeyRecord = Depends(caller)) -> VersionList:
    """Every version of a model, oldest first, with its lifecycle state."""
    registry = registry_of(request)
    decisions = registry.decisions(name)  # the owning org's only
    versions = [
        VersionOut.of(info, lifecycle_state(info, [d for d in decisions if d.version == info.version]))
        for info in registry.list_versions(name)
        if owns_version(key, info.tags.get(lineage.ORG))  # a version another org trained under a shared name
    ]
    return VersionList(versions=versions)


@router.get("/{name}/versions/{version}")
def get_version(name: str, version: VersionNumber, request: Request, key: KeyRecord = Depends(caller)) -> VersionDetailOut:
    """One version with its tags, lifecycle state and every decision on it."""
    registry = registry_of(request)
    info = registry.get_version(name, version)
    info = next((v for v in registry.list_versions(name) if v.version == version), info)  # with aliases
    decisions = registry.decisions(name, version)
    base = VersionOut.of(info, lifecycle_state(info, decisions))
    return VersionDetailOut(**base.model_dump(), decisions=[ApprovalOut.of(d) for d in decisions])
