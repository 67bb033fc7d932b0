"""``peftkit serve``: the OpenAI-compatible multi-adapter server on uvicorn.

Hook into a top-level argparse CLI with :func:`add_serve_parser`, or run ``python -m peftkit.serve``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import ipaddress
import os
import sys
from pathlib import Path

DESCRIPTION = """Serve one base model with many adapters through an OpenAI-compatible API.

Requests name the base model or an adapter in their "model" field; requests for different adapters share one
decode batch. Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /metrics
(Prometheus, per adapter), and (with --api-key-file) POST /v1/adapters {"name", "path"} and DELETE
/v1/adapters/NAME with 'Authorization: Bearer TOKEN'.

With --adapters-dir DIR, a request whose "model" is the name of a folder in DIR loads that adapter on first use
(once, however many requests ask at the same time) while the others keep decoding. --max-adapters and
--adapter-memory bound what stays resident: the least recently used idle adapters are evicted to make room (never
one with requests in flight; --adapter ones and admin-posted ones are pinned). When every resident adapter is busy,
a load waits up to --adapter-wait seconds for one to become idle, then answers 503.
"""

EPILOG = """examples:
  peftkit serve --model smollm2-135m --adapter sql=runs/sql/adapter
  peftkit serve --adapters-dir adapters/ --max-adapters 8            # adapters/<name>/ loads as model "<name>"
  peftkit serve --adapters-dir adapters/ --adapter-memory 512 --max-adapters 64
  curl -s localhost:8000/v1/models                                  # base, loaded and loadable adapters
  curl -s localhost:8000/metrics | grep peftkit_adapter_evictions     # Prometheus text
"""


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve options to ``parser``."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model: an embedded name (smollm2-135m), a local Hugging Face folder or a cached hub id "
                             "(default: %(default)s)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", type=_adapter_spec,
                        help="an adapter folder to serve as model NAME (repeatable; each NAME once)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only). The completion endpoints "
                             "have no authentication: bind elsewhere only on a trusted network")
    parser.add_argument("--port", type=_port, default=8000, help="port, 1-65535 (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="file holding the bearer token for POST/DELETE /v1/adapters (without it they answer 403)")
    parser.add_argument("--adapters-dir", type=Path, metavar="DIR",
                        help="adapter folders served on demand: a request for model NAME loads DIR/NAME on first use; "
                             "POST /v1/adapters loads folders from inside DIR only")
    parser.add_argument("--max-adapters", type=_positive, metavar="N",
                        help="adapters resident at most (default: no limit); least recently used idle ones are evicted")
    parser.add_argument("--adapter-memory", type=_positive_float, metavar="MiB",
                        help="MiB of resident adapter tensors at most (default: no limit); evicts as --max-adapters does")
    parser.add_argument("--adapter-wait", type=_positive_float, default=30.0, metavar="SECONDS",
                        help="how long a load waits for a busy adapter to become idle when the budget is full, before "
                             "answering 503 (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=_positive, default=16, metavar="N",
                        help="requests decoded together at most (default: %(default)s; 1 = one at a time)")
    parser.add_argument("--max-queue", type=_non_negative, default=64, metavar="N",
                        help="requests waiting for a batch slot at most; beyond that the server answers 429 "
                             "(default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=_positive, default=256, metavar="TOKENS",
                        help="prompt tokens prefilled per scheduler step at most, between decode steps (default: "
                             "%(default)s). Running requests wait at most one chunk's forward between tokens; a "
                             "longer prompt is prefilled over several steps. Smaller: steadier streams, slower first "
                             "tokens for long prompts")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch threads for the model (default: torch's choice, one per core). When other "
                             "processes share the cores, fewer threads avoid oversubscription, which can be far slower")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from ..cli.common import add_device_options

    add_device_options(parser, dtype_help="compute precision: auto (bf16 autocast on a GPU that has it; float32 on a CPU, "
                       "whose memory-bound decode steps bf16 autocast slows), float32, bfloat16, or float16 (GPU only) "
                       "(default auto)")
    return parser


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``serve`` verb on a top-level parser's subparsers; it sets ``func=run``."""
    parser = subparsers.add_parser("serve", help="OpenAI-compatible server for a base model and its adapters",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    parser.set_defaults(func=run)
    return parser


def tune_malloc(arenas: int = 1, mmap_threshold: int = 256 * 1024) -> None:
    """Cap glibc's malloc arenas (``MALLOC_ARENA_MAX``) and fix its mmap threshold (``MALLOC_MMAP_THRESHOLD_``) for
    this process, each unless the environment sets it already. Elsewhere (macOS, musl) this does nothing.

    Why arenas: the server allocates from many threads (HTTP handlers, the adapter loader, the scheduler); glibc
    gives each thread an arena of its own that keeps freed memory, so peak RSS grew with thread count, not with the
    adapters held. Measured with 8 adapters on demand on SmolLM2-135M: 393 MiB above one adapter, 300 MiB with two
    arenas, at the same tokens/s; with 64 adapters on demand (budget 16, four runs each, interleaved): peak 1418 MiB
    with one arena against 1498 with two, 55.6 against 55.3 tokens/s (the threads rarely allocate at once, so one
    lock costs nothing measurable).

    Why the threshold: glibc serves a block of more than 128 KiB with mmap (given back on free) only until the first
    such block is freed; then it raises the threshold to that block's size, up to 32 MiB, and serves larger and
    larger blocks from its heap, which a long-lived block placed above freed ones keeps from shrinking. A server
    frees blocks of every size from 256 KiB to 1 MiB each step (per-row adapter weights gathered for mixed rows,
    activations of fused steps of varying length) among long-lived ones (adapters loaded, cache slabs), so its
    peak RSS crept up run after run (SmolLM2-135M, 64 adapters on demand, budget 16, four runs of the same load on
    one server: 1520, 1549, 1567, 1606 MiB; with the threshold fixed at 256 KiB: 1351, 1355, 1355, 1358). Three
    fresh servers each, interleaved: peak 1345-1359 MiB against 1552-1589, at 61.6/75.2/75.6 against 73.0/77.9/78.9
    tokens/s (a few percent: fresh pages for those blocks); the one-adapter load 1062-1065 against 1067-1073 MiB. At
    1 MiB the peak did not move; at 128 KiB it cost more tokens/s for nothing more."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not os.environ.get("MALLOC_ARENA_MAX"):
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
        if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (which also stops its adjustment)
    except (OSError, AttributeError):  # not glibc
        return


def freeze_startup_objects() -> None:
    """Move every object alive once the model and the app are built out of the garbage collector's sight
    (``gc.freeze``, as vLLM does after its warm-up): they live as long as the server, and a full collection walked
    all of them. With SmolLM2-135M and 16 adapters loaded (490k tracked objects) a full collection took 183 ms, and
    the scheduler thread stood still for it: two or three per run of bench/serve_ratio.py's 512-adapter load, each a
    stall of every row, and a load that met one took 267-363 ms instead of 20-50. After the freeze, under 1 ms."""
    gc.collect()
    gc.freeze()


def tune_blas(mode: str = "AUTO") -> None:
    """Have MKL pick its kernels by the CPU's instruction set (``MKL_CBWR=AUTO``, from MKL's conditional numerical
    reproducibility settings), unless the environment sets ``MKL_CBWR``. MKL reads it at its first call, so this
    must run before the process's first matrix product.

    Why: with MKL's default dispatch, a 16-row decode step of SmolLM2-135M took 84-90 ms on a 2-core AMD EPYC
    against 69-70 ms with ``AUTO`` (three interleaved pairs of fresh processes; ``AVX2`` and ``AVX512`` did as
    ``AUTO``, ``AUTO,STRICT`` took 70-75 ms, ``MKL_ENABLE_INSTRUCTIONS=AVX512`` did not help); with ``AUTO,STRICT``
    the server's one-adapter load of bench/serve_load.py ran at 129.9 / 147.5 tokens/s against 116.5 / 120.9
    (two interleaved pairs). Builds without MKL ignore the variable."""
    os.environ.setdefault("MKL_CBWR", mode)


def run(args: argparse.Namespace) -> int:
    """Check every setting (before the model loads, which takes a while), load the model and adapters, then serve
    until interrupted. Errors are raised for the caller's handler (``peftkit.cli.errors``) to print in one line."""
    tune_blas()  # first: before anything (the hardware probe, the model load) multiplies matrices
    import uvicorn  # the 'serve' extra: a missing one is reported before anything else

    from ..errors import SettingsError
    from ..models import load_model
    from .app import create_app
    from .residency import Budget, budget_bytes

    adapters = _adapter_names(args.adapter, args.model)
    api_key = _read_api_key(args.api_key_file) if args.api_key_file else None
    if args.adapters_dir is not None and not args.adapters_dir.is_dir():
        raise SettingsError(f"--adapters-dir {args.adapters_dir} is not a directory")
    budget = Budget(args.max_adapters, budget_bytes(args.adapter_memory))
    _check_can_bind(args.host, args.port)
    if not _is_loopback(args.host):
        print(f"peftkit serve: binding to {args.host}: anyone who can reach it can run completions", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..cli.common import resolve_hardware

    device, precision = resolve_hardware(args, "serve")
    tune_malloc()
    model, tokenizer = load_model(args.model, task="causal-lm", device=device)
    if device.type == "cpu":  # built now (once per machine, seconds), not on the first mixed step, and said which
        from .. import kernels

        print(f"peftkit serve: {kernels.status()}", file=sys.stderr, flush=True)
    try:
        app = create_app(model, tokenizer, base_name=args.model, adapters=adapters, adapters_dir=args.adapters_dir,
                         api_key=api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         precision=precision, budget=budget, adapter_wait_s=args.adapter_wait,
                         prefill_chunk=args.prefill_chunk)
    except TypeError as err:  # a bad --adapter (the method cannot be served): say which and why
        raise ValueError(str(err)) from None
    freeze_startup_objects()
    names = ", ".join([args.model, *adapters])
    print(f"peftkit serve: models {names} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m peftkit.serve``: the same checks and one-line errors as ``peftkit serve``."""
    from ..cli.errors import debug_requested, run_verb

    parser = configure_parser(argparse.ArgumentParser(prog="peftkit serve", description=DESCRIPTION, epilog=EPILOG,
                                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_verb("serve", run, parser.parse_args(argv), debug_requested())


def _adapter_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` (argparse type): a name and an adapter folder that exists."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"takes NAME=PATH, got {spec!r}")
    if not (Path(path) / "adapter_config.json").exists():
        raise argparse.ArgumentTypeError(f"{spec}: {path} has no adapter_config.json (not an adapter folder)")
    return name.strip(), path


def _adapter_names(specs: list[tuple[str, str]], base: str) -> dict[str, str]:
    """Adapter name -> folder; a name given twice, or the base model's name, is refused (one would hide the other)."""
    from ..errors import SettingsError

    adapters: dict[str, str] = {}
    for name, path in specs:
        if name in adapters:
            raise SettingsError(f"--adapter {name}= is given twice ({adapters[name]} and {path}): give each adapter its own name")
        if name == base:
            raise SettingsError(f"--adapter {name}= has the base model's name: requests for {name!r} would be ambiguous; rename it")
        adapters[name] = path
    return adapters


def _check_can_bind(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a taken port or an unknown host is said before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: unknown address ({err.strerror}); use an IP address or a resolvable name") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None


def _read_api_key(path: Path) -> str:
    from ..errors import SettingsError

    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"--api-key-file {path}: {getattr(err, 'strerror', None) or 'not UTF-8 text'}") from None
    if not token or any(c.isspace() for c in token):
        raise SettingsError(f"--api-key-file {path} must hold one token (no spaces), and it is empty or has several")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
