"""What the server offers and how it is doing: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /metrics``.

A model card is OpenAI's (``id``, ``object``, ``created``, ``owned_by``) plus ``parent`` (the base model's id for
an adapter, None for the base), ``root`` and ``status``: ``"loaded"`` (attached now; ``pinned`` says whether it
can be evicted) or ``"on_disk"`` (a folder of ``--adapters-dir`` that a request loads on first use). The list
holds the base, then the loaded adapters in load order, then the loadable folders not loaded, by name.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .metrics import CONTENT_TYPE_LATEST
from .registry import AdapterInfo

router = APIRouter()


def card(model_id: str, created: int, parent: str | None, status: str = "loaded", pinned: bool | None = None) -> dict:
    body = {"id": model_id, "object": "model", "created": created, "owned_by": "peftkit", "parent": parent,
            "root": parent or model_id, "status": status}
    if pinned is not None:
        body["pinned"] = pinned
    return body


def adapter_card(info: AdapterInfo, base_name: str) -> dict:
    return card(info.name, info.created, base_name, "loaded", info.pinned)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    server = request.app.state.server
    registry = server.registry
    loaded = registry.models()
    cards = [card(registry.base_name, registry.created, None)] + [adapter_card(a, registry.base_name) for a in loaded]
    names = {a.name for a in loaded} | {registry.base_name}
    on_disk = [n for n in server.loader.loadable() if n not in names]
    now = int(time.time())
    cards += [card(n, now, registry.base_name, "on_disk") for n in on_disk]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id}")
async def model_card(model_id: str, request: Request) -> dict:
    server = request.app.state.server
    registry = server.registry
    if model_id == registry.base_name:
        return card(registry.base_name, registry.created, None)
    info = registry.info(model_id)
    if info is not None:
        return adapter_card(info, registry.base_name)
    server.loader.folder(model_id)  # 400 for a name outside the directory, 404 for no such folder
    if model_id not in server.loader.loadable():  # a folder, but not an adapter's
        raise server.loader.not_found(model_id)
    return card(model_id, int(time.time()), registry.base_name, "on_disk")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus' text format (see serve/metrics.py for what each metric means)."""
    return Response(request.app.state.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

