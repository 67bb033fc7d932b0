"""How the ``peftkit`` command reports a failure: one line ``peftkit VERB: error: WHAT (what to do)`` and an exit
status; the traceback only with ``--debug`` (or ``PEFTKIT_DEBUG=1``).

Exit statuses (the README lists them too):

- 0: done.
- 1: the command was well formed but what it read or did failed: a missing or damaged file, unusable data, an
  optional package that is not installed, a non-finite result; also an internal error (a bug), which says so and
  asks for ``--debug`` and a report.
- 2: the command itself is wrong: argparse's own errors (an unknown flag, a value of the wrong type), a setting out
  of range, of the wrong type or in conflict with another (:class:`peftkit.errors.SettingsError`).
- 130: interrupted (Ctrl-C), as shells report a process stopped by SIGINT.
- 141: whoever read the output went away (``peftkit ... | head``): nothing is printed, as when SIGPIPE kills a tool.

Common errors are turned into a specific message where they happen (the file, the line, the flag); this module is
the net under them: it classifies whatever reaches the top by its kind, so no class of error shows a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import SettingsError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141

# optional packages -> the peftkit extra that installs them (pyproject.toml)
EXTRAS = {"uvicorn": "serve", "fastapi": "serve", "starlette": "serve", "bitsandbytes": "quant"}

_OS_HINTS = {
    FileNotFoundError: "check the path",
    FileExistsError: "pick another path",
    NotADirectoryError: "a part of the path is a file, not a folder: pick another path",
    IsADirectoryError: "expected a file, got a folder",
    PermissionError: "check its permissions or pick another path",
}


def debug_requested() -> bool:
    """``PEFTKIT_DEBUG=1`` (or true/yes) in the environment: show tracebacks as if ``--debug`` were given."""
    return os.environ.get("PEFTKIT_DEBUG", "").strip().lower() in ("1", "true", "yes")


class _SigintSeen:
    """Whether a Ctrl-C arrived while the verb ran. A Ctrl-C during an import can surface as an unrelated
    ImportError (a C extension half-initialised, then "cannot load module more than once"), with no
    KeyboardInterrupt left in the exception's chain; the signal itself is the reliable witness."""

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        cls.seen = True
        signal.default_int_handler(signum, frame)


@contextmanager
def sigint_watch() -> Iterator[None]:
    """Record a Ctrl-C anywhere inside (see :class:`_SigintSeen`); the previous handler comes back on exit.

    Only from the main thread and only over Python's default handler (a caller's own handler is left alone)."""
    watch = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _SigintSeen.seen = False
    if watch:
        signal.signal(signal.SIGINT, _SigintSeen.handler)
    try:
        yield
    finally:
        if watch:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_verb(verb: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace, debug: bool) -> int:
    """``func(args)``'s exit status; any exception becomes one line on stderr and the status of its kind."""
    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not as noise at interpreter exit
        return code
    except SystemExit:
        raise
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as err:  # noqa: BLE001 - this is the top of the program: classify, never hide
        if debug:
            traceback.print_exc()
        code, message = explain(err)
        print(f"peftkit {verb}: {message}", file=sys.stderr, flush=True)
        return code


def explain(err: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that reached the top of a verb."""
    if _SigintSeen.seen or _interrupted(err):  # also a Ctrl-C during an import that a library re-raised otherwise
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    if isinstance(err, SettingsError):
        return EXIT_USAGE, f"error: {_one_line(err)}"
    if isinstance(err, ModuleNotFoundError) and err.name:
        root = err.name.split(".")[0]
        if root in EXTRAS:
            return EXIT_ERROR, (f"error: this needs the optional package {root!r}, which is not installed: "
                                f"pip install 'peftkit[{EXTRAS[root]}]'")
        return EXIT_ERROR, f"error: the Python package {root!r} is not installed: install it (pip install {root})"
    if isinstance(err, ImportError):  # peftkit's own "needs X: pip install ..." or a broken installation
        return EXIT_ERROR, f"error: {_one_line(err)}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return EXIT_ERROR, "error: out of memory: lower --batch-size or --max-length, or use a smaller model"
    if isinstance(err, OSError):
        return EXIT_ERROR, f"error: {_os_message(err)}"
    if isinstance(err, UnicodeDecodeError):  # a ValueError: before it
        return EXIT_ERROR, f"error: a file is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8"
    kind = f"{type(err).__module__}.{type(err).__name__}"
    if kind.startswith("yaml."):
        return EXIT_ERROR, f"error: invalid YAML: {_one_line(err)}: fix the file's syntax"
    if kind in ("_csv.Error", "csv.Error"):
        return EXIT_ERROR, f"error: unreadable CSV/TSV: {_one_line(err)}"
    if kind == "re.error" or type(err).__name__ == "PatternError":
        return EXIT_USAGE, f"error: invalid regular expression: {_one_line(err)}"
    if type(err).__name__ == "SafetensorError":  # safetensors.SafetensorError, without importing it here
        return EXIT_ERROR, f"error: a damaged or unreadable safetensors file ({_one_line(err)}): restore or re-save it"
    if isinstance(err, OverflowError):
        return EXIT_ERROR, f"error: a number is out of range ({_one_line(err)}): check the values given"
    if isinstance(err, ValueError):  # peftkit's own messages say what was wrong and what to do
        return EXIT_ERROR, f"error: {_one_line(err)}"
    return EXIT_ERROR, (f"internal error: {type(err).__name__}: {_one_line(err, limit=300)} "
                        "(a bug in peftkit: rerun with --debug and report it)")


def _interrupted(err: BaseException) -> bool:
    """True if ``err`` is, or was raised while handling or because of, a KeyboardInterrupt."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _os_message(err: OSError) -> str:
    if err.filename is None or err.strerror is None:  # peftkit's own FileNotFoundError("...what to do")
        return _one_line(err)
    hint = next((h for kind, h in _OS_HINTS.items() if isinstance(err, kind)), "check the path")
    if err.errno == errno.ENOSPC:
        hint = "the disk is full: free some space or pick another folder"
    return f"{err.filename}: {err.strerror}: {hint}"


def _one_line(err: BaseException, limit: int | None = None) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured): nothing left to protect
        pass
    finally:
        os.close(devnull)
