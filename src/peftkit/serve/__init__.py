"""Serve one base model with many adapters: an OpenAI-compatible HTTP API with mixed-adapter continuous batching."""

from .app import create_app
from .command import add_serve_parser, main

__all__ = ["create_app", "add_serve_parser", "main"]
