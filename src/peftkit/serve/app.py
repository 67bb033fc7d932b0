"""The HTTP API: OpenAI-compatible completions and chat for the base model and every adapter (loaded, or loaded
on demand from ``--adapters-dir``: serve/ondemand.py), plus bearer-protected adapter management. The model list
and ``/metrics`` are in serve/catalog.py.

Handlers run on the event loop and only validate, tokenize and wait; the model lives on the scheduler thread
(:mod:`peftkit.serve.scheduler`), which reports each request's text through a thread-safe callback. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so its clients raise their usual exceptions.
The routes are small functions on a module-level router; each finds the shared :class:`Server` in the app's state.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from ..device import Precision
from ..data.chat import render_chat
from .catalog import adapter_card
from .catalog import router as catalog_router
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    LoadAdapterRequest,
    busy,
    describe_validation_errors,
    error_body,
)
from .metrics import ServeMetrics
from .ondemand import AdapterLoader
from .registry import (
    AdapterConflict,
    AdapterPathError,
    AdapterRegistry,
    UnknownAdapter,
    read_adapter,
    resolve_adapter_path,
)
from .residency import Budget, Residency
from .responses import ChatReply, CompletionReply, Reply, TokenText
from .sampling import SamplingParams, choice_seed
from .scheduler import QueueFull, Scheduler
from .sequence import Event, Sequence

logger = logging.getLogger("peftkit.serve")

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming handler checks that its client is still there


class Server:
    """What the routes share: the adapter registry, the scheduler, the on-demand loader, the metrics and the
    settings."""

    def __init__(self, registry: AdapterRegistry, tokenizer: Any, scheduler: Scheduler, loader: AdapterLoader,
                 metrics: ServeMetrics, api_key: str | None) -> None:
        self.registry = registry
        self.tokenizer = tokenizer  # used on the event loop only
        # fast tokenizers are not safe to share between threads: the scheduler decodes with its own copy
        self.stream_tokenizer = copy.deepcopy(tokenizer)
        self.scheduler = scheduler
        self.loader = loader
        self.metrics = metrics
        self.adapters_dir = loader.adapters_dir
        self.api_key = api_key

    # ---------------------------------------------------------------------------------------------------------
    # Validation (every check raises an APIError that says what to change)

    async def adapter_for(self, model: str) -> str:
        """The adapter a request's ``model`` selects, loaded (on demand from --adapters-dir) and kept resident until
        the request's handler ends; 404 model_not_found for an unknown name."""
        return await self.loader.resolve(model)

    def check_prompt_ids(self, ids: list[int], param: str, adapter: str) -> None:
        """The prompt's token ids: in the vocabulary, not empty, and leaving room in the context behind ``adapter``'s
        virtual tokens (prompt or prefix tuning: they take positions before the prompt)."""
        context, virtual = self.registry.context_length, self.registry.virtual_tokens(adapter)
        bad = [t for t in ids if not 0 <= t < self.registry.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {self.registry.vocab_size})", param=param)
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param=param)
        if len(ids) + virtual >= context:
            front = f" behind the adapter's {virtual} virtual tokens" if virtual else ""
            raise APIError(400, f"the prompt is {len(ids)} tokens{front} but this model's context is {context} tokens, "
                           "leaving no room to generate; shorten the prompt", param=param, code="context_length_exceeded")

    def params(self, body: CompletionRequest | ChatCompletionRequest, adapter: str, prompt_len: int,
               max_tokens: int | None) -> SamplingParams:
        context, virtual = self.registry.context_length, self.registry.virtual_tokens(adapter)
        if max_tokens is None:  # OpenAI's chat default: as much as the context allows
            max_tokens = context - virtual - prompt_len
        if virtual + prompt_len + max_tokens > context:
            front = f"{virtual} virtual tokens of adapter {adapter!r}, " if virtual else ""
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{virtual + prompt_len + max_tokens} tokens ({front}{prompt_len} in the prompt, {max_tokens} for the "
                "completion). Reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )
        if body.n > self.scheduler.max_batch_size + self.scheduler.max_queue:
            raise APIError(400, f"n={body.n} choices can never run at once on this server (--max-batch-size "
                           f"{self.scheduler.max_batch_size} + --max-queue {self.scheduler.max_queue}); lower n", param="n")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=tuple(body.stop or ()), presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logprobs=body.logprob_count)

    def chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation through the tokenizer's chat template, ending where the assistant's reply begins."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.registry.base_name!r} has no chat template; use /v1/completions",
                           param="messages")
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        try:  # the same rendering as training (peftkit.data.chat), so adapters are served as they were trained
            text = render_chat(self.tokenizer, turns, add_generation_prompt=True)
        except Exception as err:  # the template itself rejects some conversations (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def adapter_path(self, requested: str) -> Path:
        """Where POST /v1/adapters may load ``requested`` from: inside --adapters-dir only."""
        if self.adapters_dir is None:
            raise APIError(403, "loading adapters at run time needs --adapters-dir DIR (adapters load only from "
                           "inside it)", type_="permission_error")
        try:
            return resolve_adapter_path(self.adapters_dir, requested)
        except AdapterPathError as err:
            raise APIError(400, str(err), param="path") from None

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            raise APIError(403, "adapter management is disabled: start the server with --api-key-file FILE "
                           "(a file holding the bearer token) to enable it", type_="permission_error")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "adapter management needs 'Authorization: Bearer <token>' with the token from "
                           "--api-key-file", type_="authentication_error", code="invalid_api_key")

    # ---------------------------------------------------------------------------------------------------------
    # Running one request

    def submit(self, adapter: str, prompt_ids: list[int], params: SamplingParams, n: int,
               on_event: Callable[[int, Event], None]) -> list[Sequence]:
        """Queue the request's ``n`` choices, each a row of its own (choice i seeded by :func:`choice_seed`), all
        or none; ``on_event(i, event)`` hears choice i."""
        seqs = [Sequence(adapter, prompt_ids, dataclasses.replace(params, seed=choice_seed(params.seed, i)),
                         self.stream_tokenizer, functools.partial(on_event, i)) for i in range(n)]
        for seq in seqs:
            seq.on_event = self.metrics.watch(seq)
        try:
            self.scheduler.submit(*seqs)
        except QueueFull as err:
            raise busy(err) from None
        return seqs

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.scheduler.cancel(seq)  # a no-op once finished; frees the row if the client left

    async def complete(self, request: Request, adapter: str, prompt_ids: list[int], params: SamplingParams,
                       n: int) -> list[Sequence] | None:
        """Wait for every choice's whole result; None if the client went away (its rows are freed)."""
        loop = asyncio.get_running_loop()
        ends: list[asyncio.Future[Event]] = [loop.create_future() for _ in range(n)]

        def on_event(index: int, event: Event) -> None:
            if event.kind != "text":
                done = ends[index]
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(event))

        seqs = self.submit(adapter, prompt_ids, params, n, on_event)
        try:
            pending = set(ends)
            while pending:
                finished, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S,
                                                       return_when=asyncio.FIRST_COMPLETED)
                if any(f.result().kind == "error" for f in finished):
                    break  # the request fails as a whole: its other choices are cancelled
                if not finished and await request.is_disconnected():
                    return None
        finally:
            self.cancel(seqs)
        for event in (f.result() for f in ends if f.done()):
            if event.kind == "error":
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise APIError(event.status, event.error or "generation failed", type_=kind)
        return seqs

    async def respond(self, request: Request, body: CompletionRequest | ChatCompletionRequest, adapter: str,
                      prompt_ids: list[int], max_tokens: int | None, reply: Reply) -> Response | dict:
        """What both generation endpoints do once the prompt is checked: stream ``reply`` or send it whole."""
        params = self.params(body, adapter, len(prompt_ids), max_tokens)
        if params.logprobs is not None:
            reply.tokens = TokenText(self.tokenizer)
        if body.stream:
            return self.stream(adapter, prompt_ids, params, body.n, reply, body.include_usage)
        seqs = await self.complete(request, adapter, prompt_ids, params, body.n)
        if seqs is None:
            return Response(status_code=499)
        return reply.whole(seqs, logprobs=params.logprobs is not None)

    def stream(self, adapter: str, prompt_ids: list[int], params: SamplingParams, n: int, reply: Reply,
               include_usage: bool) -> StreamingResponse:
        """Server-sent events: the reply's opening chunks, one chunk per piece of text of any choice, a closing
        chunk per choice as it finishes, the usage chunk if asked for, then [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        seqs = self.submit(adapter, prompt_ids, params, n,
                           lambda i, e: loop.call_soon_threadsafe(queue.put_nowait, (i, e)))

        async def events() -> AsyncIterator[str]:
            try:
                for chunk in reply.opening(n):
                    yield _sse(chunk)
                running = n
                while running:
                    index, event = await queue.get()
                    if event.kind == "error":
                        kind = "server_error" if event.status >= 500 else "invalid_request_error"
                        yield _sse(error_body(event.error or "generation failed", kind))
                        return
                    if event.text or event.logprobs:
                        yield _sse(reply.chunk(index, event.text, logprobs=event.logprobs))
                    if event.kind == "finish":
                        yield _sse(reply.chunk(index, None, seqs[index].finish_reason))
                        running -= 1
                if include_usage:
                    yield _sse(reply.usage_chunk(seqs))
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client disconnects (the response task is cancelled)
                self.cancel(seqs)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------------------------
# Routes


def _server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]


def _authorize(request: Request) -> None:
    _server(request).authorize(request)


router = APIRouter()


@router.get("/health")
async def health(server: ServerDep) -> dict:
    registry = server.registry
    return {"status": "ok", "model": registry.base_name, "adapters": [a.name for a in registry.models()],
            **server.scheduler.load}


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, server: ServerDep) -> Response | dict:
    adapter = await server.adapter_for(body.model)
    if isinstance(body.prompt, str):
        prompt_ids = server.tokenizer(body.prompt).input_ids
    else:
        prompt_ids = list(body.prompt)
    server.check_prompt_ids(prompt_ids, "prompt", adapter)
    return await server.respond(request, body, adapter, prompt_ids, body.max_tokens, CompletionReply(body.model))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, server: ServerDep) -> Response | dict:
    adapter = await server.adapter_for(body.model)
    prompt_ids = server.chat_prompt_ids(body.messages)
    server.check_prompt_ids(prompt_ids, "messages", adapter)
    return await server.respond(request, body, adapter, prompt_ids, body.limit, ChatReply(body.model))


# authorization is a dependency so that it is checked before the body is validated
@router.post("/v1/adapters", dependencies=[Depends(_authorize)])
async def load_adapter(body: LoadAdapterRequest, server: ServerDep) -> dict:
    """Load a pinned adapter (never evicted; it counts against the budget, making room like any load)."""
    path = server.adapter_path(body.path)
    info = await server.loader.load(body.name, path, body.path)
    return adapter_card(info, server.registry.base_name)


@router.delete("/v1/adapters/{name}", dependencies=[Depends(_authorize)])
async def delete_adapter(name: str, server: ServerDep) -> dict:
    registry, scheduler = server.registry, server.scheduler
    try:
        registry.reserve(name, loading=False)
    except UnknownAdapter as err:
        raise APIError(404, str(err), param="name", code="model_not_found") from None
    except AdapterConflict as err:
        raise APIError(409, str(err), param="name") from None
    try:
        # requests already using it finish first; new ones get 404 from now on
        await asyncio.wrap_future(scheduler.call(lambda: registry.detach(name), ready=lambda: not scheduler.in_use(name)))
    finally:
        registry.release(name)
    return {"id": name, "object": "model", "deleted": True}


# ----------------------------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape


async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(list(err.errors()))
    return JSONResponse(error_body(message, param=param), 400)


async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return JSONResponse(error_body(message), err.status_code, headers=getattr(err, "headers", None))


async def _crash(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), 500)


_ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _invalid, StarletteHTTPException: _http, Exception: _crash}


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    model: nn.Module,
    tokenizer: Any,
    *,
    base_name: str,
    adapters: dict[str, str] | None = None,
    adapters_dir: str | Path | None = None,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    precision: Precision | None = None,
    budget: Budget = Budget(),
    adapter_wait_s: float = 30.0,
    prefill_chunk: int = 256,
) -> FastAPI:
    """The FastAPI app serving ``model`` as ``base_name`` and each of ``adapters`` (name -> folder) by name.

    ``adapters_dir``: the folders a request's ``model`` loads on demand, and where POST /v1/adapters may load from
    (nothing outside it). ``budget``: resident adapters at most (count and/or bytes); least recently used idle ones
    are evicted for room, ``adapters`` and admin-posted ones are pinned. ``adapter_wait_s``: how long a load waits
    for an adapter to become idle when the budget is full of busy ones (then 503). ``api_key``: the bearer token for
    adapter management (None disables it). The scheduler thread starts and stops with the app's lifespan.
    Everything runs on ``model``'s device, under ``precision``'s autocast (None: float32). ``prefill_chunk``: prompt
    tokens prefilled per scheduler step at most (:mod:`peftkit.serve.prefill`).
    """
    registry = AdapterRegistry(model, tokenizer, base_name, precision, slot_capacity=budget.max_adapters)
    for name, path in (adapters or {}).items():
        _attach_at_start(registry, name, path)
    scheduler = Scheduler(registry, max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=prefill_chunk)
    residency = Residency(registry, budget, busy=scheduler.in_use)
    _check_pinned_fit(registry, residency)
    metrics = ServeMetrics(registry, residency, lambda: scheduler.load, scheduler.counters)
    folder = Path(adapters_dir).resolve() if adapters_dir is not None else None
    loader = AdapterLoader(registry, scheduler, residency, metrics, folder, wait_s=adapter_wait_s)
    app = FastAPI(title="peftkit serve", version="1", lifespan=_lifespan, exception_handlers=_ERROR_HANDLERS)
    app.state.server = Server(registry, tokenizer, scheduler, loader, metrics, api_key)
    app.include_router(router)
    app.include_router(catalog_router)
    return app


def _check_pinned_fit(registry: AdapterRegistry, residency: Residency) -> None:
    """The adapters named at start must fit the budget by themselves (they are never evicted)."""
    pinned = registry.models()
    if pinned and not residency.fits(len(pinned), sum(a.bytes for a in pinned)):
        raise ValueError(f"the {len(pinned)} --adapter adapter(s) ({sum(a.bytes for a in pinned) / 2**20:.2f} MiB) "
                         f"exceed {residency.budget.describe()}; they are never evicted: raise the budget")


def _attach_at_start(registry: AdapterRegistry, name: str, path: str) -> None:
    registry.reserve(name, loading=True)
    try:
        config, tensors = read_adapter(path)
        registry.attach(name, config, tensors, path)
    finally:
        registry.release(name)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The scheduler thread runs while the app does."""
    scheduler = app.state.server.scheduler
    scheduler.start()
    try:
        yield
    finally:
        scheduler.shutdown()
