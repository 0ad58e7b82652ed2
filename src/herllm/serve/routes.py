"""The OpenAI-compatible routes: chat completions, completions, models, and feedback.

Bodies are read after the token is checked (so a request without a valid token gets 401
whatever its body), then validated against `herllm.serve.schemas`. (No `from __future__ import
annotations` here: FastAPI must evaluate the `Depends(auth)` annotations, whose `auth` is local.)"""

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from herllm.serve import exchange
from herllm.serve import schemas as S
from herllm.serve.auth import Principal
from herllm.serve.errors import ApiError, from_validation
from herllm.serve.log import FeedbackError


async def parse(request: Request, model):
    body = await request.body()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as exc:
        raise from_validation(exc) from None


def _usage(p, out) -> S.Usage:
    return S.Usage(prompt_tokens=p.prompt_tokens, completion_tokens=out.completion_tokens,
                   total_tokens=p.prompt_tokens + out.completion_tokens)  # fmt: skip


def _herllm(p) -> dict:
    return {"version": p.version, "facts": p.facts}


def register(app: FastAPI, deps, auth) -> None:
    m = deps.metrics

    def answer(p, req, route: str):
        """Non-streamed: generate, log, then the whole body."""
        start = time.perf_counter()
        with deps.in_flight or contextlib.nullcontext():
            gen = exchange.run(deps, p, req)
            while True:
                try:
                    next(gen)
                except StopIteration as done:
                    out = done.value
                    break
        m.latency.labels(route).observe(time.perf_counter() - start)
        m.requests.labels(route, "200").inc()
        usage = _usage(p, out)
        if p.kind == "chat":
            choice = S.ChatChoice(message=S.AssistantMessage(content=out.text),
                                  finish_reason=out.finish_reason)  # fmt: skip
            body = S.ChatCompletion(id=p.id, created=p.created, model=req.model,
                                    system_fingerprint=p.version, choices=[choice], usage=usage)  # fmt: skip
        else:
            choice = S.CompletionChoice(text=out.text, finish_reason=out.finish_reason)
            body = S.Completion(id=p.id, created=p.created, model=req.model,
                                system_fingerprint=p.version, choices=[choice], usage=usage)  # fmt: skip
        return JSONResponse(body.model_dump() | {"herllm": _herllm(p)},
                            headers={"X-Herllm-Version": p.version})  # fmt: skip

    def sse(p, req, route: str) -> Iterator[str]:
        """Streamed: role chunk, content chunks, (log), finish chunk, usage chunk, [DONE]."""
        start = time.perf_counter()
        chat = p.kind == "chat"

        def chunk(text=None, finish=None, role=None, usage=None) -> str:
            if chat:
                choices = [] if usage else [S.ChunkChoice(delta=S.Delta(role=role, content=text),
                                                          finish_reason=finish)]  # fmt: skip
                c = S.ChatCompletionChunk(id=p.id, created=p.created, model=req.model,
                                          system_fingerprint=p.version, choices=choices, usage=usage)  # fmt: skip
            else:
                choices = (
                    [] if usage else [S.CompletionChoice(text=text or "", finish_reason=finish)]
                )
                c = S.Completion(id=p.id, created=p.created, model=req.model,
                                 system_fingerprint=p.version, choices=choices, usage=usage)  # fmt: skip
            data = c.model_dump(exclude_none=False) | {"herllm": _herllm(p)}
            return f"data: {json.dumps(data)}\n\n"

        with deps.in_flight or contextlib.nullcontext():
            try:
                if chat:
                    yield chunk(text="", role="assistant")
                gen = exchange.run(deps, p, req)
                while True:
                    try:
                        yield chunk(text=next(gen))
                    except StopIteration as done:
                        out = done.value  # the exchange is in the log now
                        break
            except Exception as exc:  # headers are sent: report it in the stream, no [DONE]
                m.requests.labels(route, "500").inc()
                err = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
        yield chunk(finish=out.finish_reason)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk(usage=_usage(p, out))
        yield "data: [DONE]\n\n"
        m.latency.labels(route).observe(time.perf_counter() - start)
        m.requests.labels(route, "200").inc()

    async def complete(request: Request, who: Principal, schema, kind: str, route: str):
        try:
            req = await parse(request, schema)
            p = await run_in_threadpool(exchange.prepare, deps, who.user, req, kind)
        except ApiError as exc:
            m.requests.labels(route, str(exc.status)).inc()
            raise
        if req.stream:
            return StreamingResponse(sse(p, req, route), media_type="text/event-stream",
                                     headers={"X-Herllm-Version": p.version,
                                              "Cache-Control": "no-cache"})  # fmt: skip
        return await run_in_threadpool(answer, p, req, route)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, who: Annotated[Principal, Depends(auth)]):
        return await complete(request, who, S.ChatCompletionRequest, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request, who: Annotated[Principal, Depends(auth)]):
        return await complete(request, who, S.CompletionRequest, "completion", "/v1/completions")

    @app.get("/v1/models")
    def models(_who: Annotated[Principal, Depends(auth)]) -> S.ModelList:
        serving = deps.versions.current()[0]
        created = int(time.time())
        data = [S.ModelCard(id=deps.model_name, created=created, version=serving, serving=True)]
        for v in reversed(deps.versions.available()):
            data.append(S.ModelCard(id=f"{deps.model_name}@{v}", created=created, version=v,
                                    serving=v == serving))  # fmt: skip
        return S.ModelList(data=data)

    @app.post("/v1/feedback")
    async def feedback(
        request: Request, who: Annotated[Principal, Depends(auth)]
    ) -> S.FeedbackResponse:
        req = await parse(request, S.FeedbackRequest)
        if req.rating is None and req.correction is None:
            raise ApiError(400, "give a rating (up or down) or a correction", param="rating")
        try:
            res = await run_in_threadpool(deps.log.feedback, req.id, who.user, req.rating,
                                          req.correction)  # fmt: skip
        except FeedbackError:
            raise ApiError(404, f"no completion {req.id!r} of yours in the log", param="id",
                           code="not_found") from None  # fmt: skip
        m.feedback.labels("correction" if req.correction else req.rating).inc()
        return S.FeedbackResponse(id=req.id, applies_to_training=res["applies_to_training"])
