"""The OpenAI-compatible HTTP API of a replica (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with `stream=true`),
GET /v1/models, GET /health, GET /metrics. Errors are OpenAI-shaped. The generation event
goes out in a background task, after the response has been sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.logs import event as log_event
from services.serving import responses as R
from services.serving.chat import encode_prompt, render_chat
from services.serving.engines.base import Job
from services.serving.errors import ApiError
from services.serving.events import generation_event
from services.serving.ids import new_generation_id, pseudonymous_user_id, session_id_or_none
from services.serving.params import (
    ChatRequest,
    CompletionRequest,
    GenParams,
    Limits,
    completion_prompt,
    gen_params,
    include_usage,
    parse_chat,
    parse_completion,
)
from services.serving.replica import Replica

log = logging.getLogger(__name__)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class Call:
    """One API call's context: ids, prompt, params, and the job generating it."""

    endpoint: str
    meta: R.Meta
    prompt_text: str
    prompt_ids: list[int]
    params: GenParams
    user_id: str
    session_id: str | None
    started_s: float
    job: Job


def create_app(replica: Replica) -> FastAPI:
    """The FastAPI app serving `replica` (started and stopped by the app's lifespan)."""
    from contextlib import asynccontextmanager

    settings = replica.settings
    engine = replica.engine
    tokenizer = engine.tokenizer
    limits = Limits(
        max_model_len_tokens=engine.max_model_len,
        default_max_tokens=min(settings.default_max_tokens, engine.max_model_len),
        max_top_logprobs=settings.max_top_logprobs,
    )
    metrics = replica.metrics

    @lru_cache(maxsize=65536)
    def decode1(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(replica.start)
        try:
            yield
        finally:
            await asyncio.to_thread(replica.stop)

    app = FastAPI(title="rlfeed serving replica", lifespan=lifespan, docs_url=None, redoc_url=None)

    # --- errors ----------------------------------------------------------------------
    def _error(err: ApiError, endpoint: str | None = None) -> ORJSONResponse:
        if endpoint:
            metrics.requests.labels(endpoint, str(err.status)).inc()
        return ORJSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ApiError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(ApiError(str(first.get("msg", "invalid request")), param=param))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        log.exception("request_failed")
        return _error(
            ApiError(f"internal error: {type(exc).__name__}", status=500, type="server_error"), request.url.path
        )

    async def _body(request: Request) -> Any:
        raw = await request.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(f"request body is not valid JSON: {exc}") from None

    def _check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(
                f"model: this replica serves {settings.model_name!r}, not {name!r}",
                param="model",
                status=404,
                type="invalid_request_error",
                code="model_not_found",
            )

    # --- generation ------------------------------------------------------------------
    def _start(
        endpoint: str,
        request: Request,
        req: ChatRequest | CompletionRequest,
        prompt_text: str,
        prompt_ids: list[int],
        stream: bool,
    ) -> Call:
        if not prompt_ids:
            raise ApiError("prompt: must not be empty", param="prompt")
        params = gen_params(req, len(prompt_ids), limits)
        user = req.user or request.headers.get(settings.user_header)
        gid = new_generation_id()
        meta = R.Meta(gid, settings.model_name, int(time.time()), replica.replica_id)
        job = Job(prompt_ids, params, decode=engine.decode, loop=asyncio.get_running_loop(), stream=stream)
        user_id = pseudonymous_user_id(user, salt=settings.user_id_salt, hash_all=settings.hash_all_user_ids)
        job.candidate = user is not None and replica.wants_candidate(user_id)
        try:
            engine.submit(job)
        except RuntimeError as exc:
            raise ApiError(str(exc), status=503, type="server_error", code="shutting_down") from None
        replica.requests_total += 1
        metrics.prompt_tokens.inc(len(prompt_ids))
        return Call(
            endpoint,
            meta,
            prompt_text,
            prompt_ids,
            params,
            user_id,
            session_id_or_none(request.headers.get(settings.session_header), salt=settings.user_id_salt),
            time.monotonic(),
            job,
        )

    def _meta(call: Call) -> R.Meta:
        return R.Meta(
            call.meta.generation_id, call.meta.model, call.meta.created, call.meta.replica_id, call.job.version
        )

    def _finished(call: Call) -> None:
        """After the response went out: metrics and the generation event. Never raises: it
        runs as a background task, where an exception would only reach a log line, so an
        event lost to a bug is counted like any other lost event (`dropped["error"]`)."""
        try:
            _record(call)
        except Exception as exc:
            log_event(
                log, "generation_event_failed", logging.ERROR, generation_id=call.meta.generation_id, error=repr(exc)
            )
            replica.sink.drop("error")

    def _record(call: Call) -> None:
        job = call.job
        latency_s = time.monotonic() - call.started_s
        metrics.request_latency.labels(call.endpoint).observe(latency_s)
        if job.finish_reason not in ("stop", "length") or job.version is None:
            return
        try:
            ev = generation_event(
                generation_id=call.meta.generation_id,
                model=settings.model_name,
                policy_version=job.version,
                prompt=call.prompt_text,
                completion=job.text,
                prompt_token_ids=call.prompt_ids,
                completion_token_ids=[t.token_id for t in job.tokens],
                completion_logprobs=[t.logprob for t in job.tokens],
                temperature=call.params.temperature,
                top_p=call.params.top_p,
                max_tokens=call.params.max_tokens,
                seed=call.params.seed,
                finish_reason=job.finish_reason,
                user_id=call.user_id,
                session_id=call.session_id,
                replica_id=replica.replica_id,
                latency_ms=latency_s * 1000.0,
            )
        except Exception as exc:  # e.g. a prompt beyond the contract's limits: serve it, log it
            log_event(
                log, "generation_event_invalid", logging.WARNING, generation_id=call.meta.generation_id, error=str(exc)
            )
            replica.sink.drop("invalid_event")
            return
        replica.emit_generation(ev)

    async def _wait(call: Call) -> None:
        try:
            await call.job.wait()
        except asyncio.CancelledError:
            call.job.cancelled = True
            raise
        except Exception as exc:
            raise ApiError(f"generation failed: {exc}", status=500, type="server_error") from None

    def _headers(call: Call) -> dict[str, str]:
        return {"x-rlfeed-generation-id": call.meta.generation_id}

    async def _stream(call: Call, chat: bool, with_usage: bool) -> AsyncIterator[bytes]:
        """SSE chunks of a streamed response; marks the job cancelled if the client leaves."""
        job = call.job
        sent_role = False
        text_pos = 0
        try:
            async for delta in job.deltas():
                meta = _meta(call)
                if delta.error is not None:
                    err = ApiError(f"generation failed: {delta.error}", status=500, type="server_error")
                    yield _sse(err.body() | meta.extra())
                    break
                if chat and not sent_role:
                    sent_role = True
                    yield _sse(R.chat_chunk(meta, {"role": "assistant", "content": ""}))
                lp = None
                if call.params.want_logprobs and delta.tokens:
                    lp = (
                        R.chat_logprobs(delta.tokens, decode1)
                        if chat
                        else R.completion_logprobs(delta.tokens, decode1, text_pos)
                    )
                if delta.text or lp is not None:
                    if chat:
                        yield _sse(R.chat_chunk(meta, {"content": delta.text}, logprobs=lp))
                    else:
                        yield _sse(R.completion_chunk(meta, delta.text, logprobs=lp))
                    text_pos += len(delta.text)
                if delta.finish_reason is not None:
                    if chat:
                        yield _sse(R.chat_chunk(meta, {}, finish_reason=delta.finish_reason))
                    else:
                        yield _sse(R.completion_chunk(meta, "", finish_reason=delta.finish_reason))
                    if with_usage:
                        u = R.usage(len(call.prompt_ids), len(job.tokens))
                        chunk = R.chat_chunk if chat else R.completion_chunk
                        yield _sse(chunk(meta, {} if chat else "", usage_=u, empty_choices=True))  # type: ignore[arg-type]
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(call.endpoint, "200").inc()
        finally:
            if not job.done:
                job.cancelled = True

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(await _body(request))
        _check_model(req.model)
        prompt = render_chat(tokenizer, req.messages)
        call = _start(
            "/v1/chat/completions",
            request,
            req,
            prompt,
            encode_prompt(tokenizer, prompt, templated=True),
            bool(req.stream),
        )
        if req.stream:
            return StreamingResponse(
                _stream(call, True, include_usage(req)),
                media_type="text/event-stream",
                headers=_headers(call),
                background=BackgroundTask(_finished, call),
            )
        await _wait(call)
        job = call.job
        body = R.chat_body(
            _meta(call),
            job.text,
            job.finish_reason,
            job.tokens if call.params.want_logprobs else None,
            decode1,
            len(call.prompt_ids),
            len(job.tokens),
        )
        metrics.requests.labels(call.endpoint, "200").inc()
        return ORJSONResponse(body, headers=_headers(call), background=BackgroundTask(_finished, call))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion(await _body(request))
        _check_model(req.model)
        prompt = completion_prompt(req)
        if isinstance(prompt, str):
            text, ids = prompt, encode_prompt(tokenizer, prompt, templated=False)
        else:
            if any(i < 0 or i >= len(tokenizer) for i in prompt):
                raise ApiError("prompt: token id out of the vocabulary", param="prompt")
            text, ids = tokenizer.decode(prompt, skip_special_tokens=False), prompt
        call = _start("/v1/completions", request, req, text, ids, bool(req.stream))
        if req.stream:
            return StreamingResponse(
                _stream(call, False, include_usage(req)),
                media_type="text/event-stream",
                headers=_headers(call),
                background=BackgroundTask(_finished, call),
            )
        await _wait(call)
        job = call.job
        body = R.completion_body(
            _meta(call),
            job.text,
            job.finish_reason,
            job.tokens if call.params.want_logprobs else None,
            decode1,
            len(ids),
            len(job.tokens),
        )
        metrics.requests.labels(call.endpoint, "200").inc()
        return ORJSONResponse(body, headers=_headers(call), background=BackgroundTask(_finished, call))

    # --- info ------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> Response:
        return ORJSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": settings.model_name,
                        "object": "model",
                        "created": int(replica.started_at),
                        "owned_by": "rlfeed",
                        "max_model_len": engine.max_model_len,
                        "policy_version": engine.version,
                        "replica_id": replica.replica_id,
                    }
                ],
            }
        )

    @app.get("/health")
    async def health() -> Response:
        body = {
            "status": "ok" if replica.state.value in ("serving", "loading", "error") else replica.state.value,
            "replica_id": replica.replica_id,
            "model": settings.model_name,
            "engine": engine.name,
            "policy_version": engine.version,
            "candidate_version": engine.candidate_version,
            "candidate_traffic": replica.split.candidate_traffic if engine.candidate_version is not None else 0.0,
            "state": replica.state.value,
            "loading": replica.loading,
            "last_update_error": replica.last_error,
            "last_swap": None
            if not replica.swaps
            else {
                "version": replica.swaps[-1].version,
                "served_at": replica.swaps[-1].served_at,
                "pause_ms": round(replica.swaps[-1].pause_s * 1000, 3),
                "load_ms": round(replica.swaps[-1].load_s * 1000, 1),
            },
            "queue_depth": engine.queue_depth,
            "requests_total": replica.requests_total,
            "kafka": replica.bootstrap is not None,
            "events": {
                "emitted": replica.sink.emitted,
                "delivered": replica.sink.delivered,
                "buffered": replica.sink.buffered,
                "dropped": replica.sink.dropped_by_reason(),
            },
        }
        return ORJSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
