"""The FastAPI application: OpenAI's `/v1/models` and `/v1/chat/completions`, plus `/health`.

Every failure is answered as OpenAI's error JSON with its HTTP status (400 bad value, 401 bad key,
404 unknown model or path, 413 body too large, 422 invalid field, 429 queue full, 500 with no
detail); the traceback goes to the server's log only. A request whose client disconnects is
cancelled: its row leaves the batch at the next token.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, AsyncIterator, Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentmesh.errors import AgentMeshError
from agentmesh.models.inference import GenerationConfig
from agentmesh.serve import protocol
from agentmesh.serve.config import Limits
from agentmesh.serve.engine import Engine, Job
from agentmesh.serve.protocol import APIError, ChatCompletionRequest

log = logging.getLogger("agentmesh.serve")


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="request_too_large")
    return bytes(body)


def _check_key(request: Request, keys: frozenset[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        raise APIError(401, "the API key is not valid", code="invalid_api_key")


def _generation(req: ChatCompletionRequest, engine: Engine, prompt_tokens: int, limits: Limits) -> GenerationConfig:
    asked = req.token_limit
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens={asked} is more than this server allows ({limits.max_tokens})",
                       param="max_tokens", code="invalid_value")
    context = engine.context_length
    room = None if context is None else context - prompt_tokens
    if room is not None and room < 1:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; model {req.model!r} reads at most {context}",
                       param="messages", code="context_length_exceeded")
    if asked is not None and room is not None and asked > room:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens={asked} is more than the "
                            f"{context} tokens model {req.model!r} reads", param="max_tokens",
                       code="context_length_exceeded")
    max_new = asked if asked is not None else min(limits.default_max_tokens, room or limits.default_max_tokens)
    temperature = req.temperature if req.temperature is not None else engine.default_temperature
    return GenerationConfig(
        max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed,
        eos_token_ids=() if req.ignore_eos else engine.eos_token_ids)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def create_app(engines: Mapping[str, Engine], *, limits: Limits | None = None,
               api_keys: frozenset[str] | set[str] = frozenset()) -> FastAPI:
    """The server for `engines` (served name -> engine). With `api_keys`, `/v1/*` needs one of them."""
    limits = limits or Limits()
    keys = frozenset(api_keys)
    created = int(time.time())
    app = FastAPI(title="agentmesh", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engines = dict(engines)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return _error(APIError(404, f"no such path: {request.method} {request.url.path}", code="unknown_url"))
        if e.status_code == 405:
            return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}"))
        return _error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        return _error(APIError(422, f"{where}: {err.get('msg', 'invalid')}", param=where))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(APIError(500, "internal server error (details are in the server's log)"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {
            name: {"kind": e.kind, "batches": e.stats.batches, "requests": e.stats.rows,
                   "largest_batch": e.stats.largest_batch, "cancelled": e.stats.cancelled}
            for name, e in app.state.engines.items()}}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        _check_key(request, keys)
        return {"object": "list",
                "data": [protocol.model_card(n, created, e.description) for n, e in app.state.engines.items()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        _check_key(request, keys)
        engine = app.state.engines.get(name)
        if engine is None:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return protocol.model_card(name, created, engine.description)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        start = time.perf_counter()
        _check_key(request, keys)
        req = protocol.parse_request(await _read_body(request, limits.max_request_bytes))
        engine = app.state.engines.get(req.model)
        if engine is None:
            known = ", ".join(app.state.engines)
            raise APIError(404, f"the model {req.model!r} does not exist; this server has: {known}",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
        conversation = req.conversation()
        try:
            prompt_tokens = await asyncio.to_thread(engine.count_prompt, conversation)
            gen = _generation(req, engine, prompt_tokens, limits)
        except AgentMeshError as e:
            raise APIError(400, e.message, param="messages") from None
        job = engine.submit(conversation, gen, req.stop or (), prompt_tokens)
        cid = protocol.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, req.model, cid, include_usage, start, request),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await _until_done(job, request)
        if text is None:
            return Response(status_code=499)  # nobody is listening any more
        _log(request, req.model, job, start, stream=False)
        return JSONResponse(protocol.completion(cid, req.model, text, job.finish_reason or "stop",
                                                job.prompt_tokens, job.completion_tokens))

    return app


async def _until_done(job: Job, request: Request) -> str | None:
    """The job's whole text; None (and the job cancelled) when the client disconnects first."""
    answer = asyncio.ensure_future(job.text())

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            job.cancel()
            log.info("client left: request for %d tokens cancelled after %d", job.config.max_new_tokens,
                     job.completion_tokens)
            answer.cancel()
            return None
        return _raise_as_api(answer)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job has finished


def _raise_as_api(answer: asyncio.Future[str]) -> str:
    error = answer.exception()
    if error is None:
        return answer.result()
    if isinstance(error, AgentMeshError):
        raise APIError(400, error.message)
    raise error


async def _stream(job: Job, model: str, cid: str, include_usage: bool, start: float,
                  request: Request) -> AsyncIterator[bytes]:
    created = int(time.time())
    try:
        yield _sse(protocol.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        try:
            async for piece in job.stream():
                yield _sse(protocol.chunk(cid, model, created, {"content": piece}))
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in the stream
            message = e.message if isinstance(e, AgentMeshError) else "internal server error (see the server's log)"
            log.error("request %s failed while streaming: %s", cid, e)
            yield _sse(APIError(500, message).body())
            yield b"data: [DONE]\n\n"
            return
        yield _sse(protocol.chunk(cid, model, created, {}, finish_reason=job.finish_reason or "stop"))
        if include_usage:
            yield _sse(protocol.chunk(cid, model, created,
                                      usage_=protocol.usage(job.prompt_tokens, job.completion_tokens)))
        yield b"data: [DONE]\n\n"
        _log(request, model, job, start, stream=True)
    finally:
        if not job.done:
            log.info("client left: streaming request %s cancelled after %d tokens", cid, job.completion_tokens)
        job.cancel()


def _log(request: Request, model: str, job: Job, start: float, *, stream: bool) -> None:
    ttft = "-" if job.first_token_s is None else f"{job.first_token_s * 1000:.0f}"
    log.info("%s %s model=%s stream=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s latency_ms=%.0f finish=%s",
             request.method, request.url.path, model, "yes" if stream else "no", job.prompt_tokens,
             job.completion_tokens, ttft, (time.perf_counter() - start) * 1000, job.finish_reason)
