"""``peftkit serve``: the OpenAI-compatible multi-adapter server on uvicorn.

Hook into a top-level argparse CLI with :func:`add_serve_parser`, or run ``python -m peftkit.serve``.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

DESCRIPTION = """Serve one base model with many adapters through an OpenAI-compatible API.

Requests name the base model or an adapter in their "model" field; requests for different adapters share one
decode batch. Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and (with
--api-key-file) POST /v1/adapters {"name", "path"} and DELETE /v1/adapters/NAME with 'Authorization: Bearer TOKEN'.
"""


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve options to ``parser``."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model: an embedded name (smollm2-135m), a local Hugging Face folder or a cached hub id "
                             "(default: %(default)s)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter folder to serve as model NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only). The completion endpoints "
                             "have no authentication: bind elsewhere only on a trusted network")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="file holding the bearer token for POST/DELETE /v1/adapters (without it they answer 403)")
    parser.add_argument("--adapters-dir", type=Path, metavar="DIR",
                        help="POST /v1/adapters loads folders from inside DIR only")
    parser.add_argument("--max-batch-size", type=_positive, default=16, metavar="N",
                        help="requests decoded together at most (default: %(default)s; 1 = one at a time)")
    parser.add_argument("--max-queue", type=_non_negative, default=64, metavar="N",
                        help="requests waiting for a batch slot at most; beyond that the server answers 429 "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch threads for the model (default: torch's choice, one per core). When other "
                             "processes share the cores, fewer threads avoid oversubscription, which can be far slower")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` verb on a top-level parser's subparsers; it sets ``func=run``."""
    parser = subparsers.add_parser("serve", help="OpenAI-compatible server for a base model and its adapters",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model and adapters, then serve until interrupted."""
    import uvicorn

    from ..models import load_model
    from .app import create_app

    adapters = dict(_parse_adapter(spec) for spec in args.adapter)
    api_key = _read_api_key(args.api_key_file) if args.api_key_file else None
    if args.adapters_dir is not None and not args.adapters_dir.is_dir():
        raise SystemExit(f"--adapters-dir {args.adapters_dir} is not a directory")
    if not _is_loopback(args.host):
        print(f"peftkit serve: binding to {args.host}: anyone who can reach it can run completions", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    try:
        app = create_app(model, tokenizer, base_name=args.model, adapters=adapters, adapters_dir=args.adapters_dir,
                         api_key=api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    except (OSError, ValueError, TypeError) as err:  # a bad --adapter: say which and why, no traceback
        raise SystemExit(f"peftkit serve: {err}") from None
    names = ", ".join([args.model, *adapters])
    print(f"peftkit serve: models {names} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="peftkit serve", description=DESCRIPTION,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


def _parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--adapter takes NAME=PATH, got {spec!r}")
    if not (Path(path) / "adapter_config.json").exists():
        raise SystemExit(f"--adapter {spec}: {path} has no adapter_config.json")
    return name, path


def _read_api_key(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise SystemExit(f"--api-key-file {path}: {err.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise SystemExit(f"--api-key-file {path} must hold one token (no spaces), and it is empty or has several")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
