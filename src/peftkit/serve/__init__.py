"""Serve one base model with many adapters: an OpenAI-compatible HTTP API with mixed-adapter continuous batching.

``create_app`` is imported on first use, so that ``peftkit --help`` (which registers the serve verb through
:func:`add_serve_parser`) does not pay for FastAPI and transformers.
"""

from typing import Any

from .command import add_serve_parser, main

__all__ = ["create_app", "add_serve_parser", "main"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
