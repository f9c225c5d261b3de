"""The OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine.

Bad input never reaches the engine's state: body fields are checked by the schemas, the prompt
against the window by LLMEngine.add_request (all of a call's requests are added or none), and
every error goes out as OpenAI's {"error": {...}} body. A client that goes away, streaming or not,
aborts its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from longserve.engine.async_engine import AsyncEngine, Delta, EngineDeadError, Generation
from longserve.engine.llm import LLMEngine
from longserve.serve.metrics import ServerMetrics, engine_stats
from longserve.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


@dataclass
class Choice:
    """One choice as its deltas arrive."""

    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        self.num_output_tokens = d.num_output_tokens
        self.num_prompt_tokens, self.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens


def usage(choices: list[Choice], n: int) -> Usage:
    """Each prompt counts once however many choices (n) it has, as OpenAI counts it."""
    firsts = choices[::n]
    prompt = sum(c.num_prompt_tokens for c in firsts)
    completion = sum(c.num_output_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(c.num_cached_tokens for c in firsts)
        ),
    )


def validation_error(errors: list[dict]) -> JSONResponse:
    """A 400 naming the first bad field (as `param`) and every problem in the message."""
    if any(r.get("type") == "json_invalid" for r in errors):
        return error_response(400, "the body is not valid JSON")
    msgs, params = [], []
    for r in errors:
        loc = [str(x) for x in r.get("loc", ()) if x != "body"]
        msgs.append(f"{'.'.join(loc) or 'body'}: {r.get('msg')}")
        params.append(loc[0] if loc else None)
    return error_response(400, "; ".join(msgs), params[0] if params else None)


def sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is already read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(gen: Generation, request: Request, count: int) -> list[Choice] | None:
    """All choices of a non-streamed call, or None if the client left first (then aborted)."""
    choices = [Choice() for _ in range(count)]

    async def run() -> None:
        async for d in gen:
            choices[d.index].add(d)

    task, gone = asyncio.ensure_future(run()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        gen.abort()
        for t in (task, gone):
            if not t.done():
                t.cancel()
                with suppress(asyncio.CancelledError):
                    await t
    if not finished:
        return None
    task.result()  # an engine that stopped raises here
    return choices


async def stream_events(
    gen: Generation,
    count: int,
    include_usage: bool,
    n: int,
    chunk: Callable[..., str],
    choice: Callable[[Delta], BaseModel],
    opening: Sequence[BaseModel] = (),
) -> AsyncIterator[str]:
    """One request's SSE events: an opening chunk per choice if given, a chunk per delta, the
    usage if asked, then [DONE]. An engine failure becomes an error event, and the request is
    aborted however the stream ends (a client gone mid-stream included)."""
    acc = [Choice() for _ in range(count)]
    try:
        for c in opening:
            yield chunk([c])
        async for d in gen:
            acc[d.index].add(d)
            yield chunk([choice(d)])
        if include_usage:
            yield chunk([], usage(acc, n))
    except EngineDeadError as e:
        yield f"data: {error_response(500, str(e)).body.decode()}\n\n"
    finally:
        gen.abort()
    yield "data: [DONE]\n\n"


def stream_response(events: AsyncIterator[str], gen: Generation) -> StreamingResponse:
    """SSE; the background abort covers a client that leaves before the stream even starts."""

    async def abort() -> None:
        gen.abort()

    return StreamingResponse(
        events, media_type="text/event-stream", background=BackgroundTask(abort)
    )


def create_app(engine: LLMEngine, served_model_name: str | None = None) -> FastAPI:
    """An app serving `engine`; the engine thread runs for the app's lifespan."""
    model_name = served_model_name or engine.cfg.model
    metrics = ServerMetrics(model_name)
    aengine = AsyncEngine(engine, on_token=metrics.on_token)
    tok = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aengine.start()
        yield
        aengine.stop()

    app = FastAPI(title="longserve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e.errors())

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(500, str(e))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )

    def chat_text(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
        if tok is None or tok.chat_template is None:
            raise APIError(400, f"{model_name} has no chat template: use /v1/completions")
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as e:  # templates reject some conversations (role order)
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from e

    async def submit(
        rid: str, prompts: list, body: SamplingRequest, max_tokens: int | None, add_special: bool
    ) -> Generation:
        """All prompts x n choices as one call; choice j of prompt i is index i * n + j."""
        try:
            params = body.sampling_params(max_tokens)
            return await aengine.submit(
                rid, [p for p in prompts for _ in params], params * len(prompts), add_special
            )
        except ValueError as e:
            raise APIError(400, str(e)) from e

    @app.get("/health")
    async def health() -> Response:
        if aengine.error is not None:
            return error_response(503, f"the engine stopped: {aengine.error}")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = await aengine.call(engine_stats, engine)
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        if tok is None:
            raise APIError(400, f"{model_name} has no tokenizer")
        if body.messages is not None:
            text = chat_text(body.messages, body.add_generation_prompt)
            special = bool(body.add_special_tokens)
        else:
            text, special = body.prompt, body.add_special_tokens is not False
        ids = await aengine.call(lambda: tok.encode(text, add_special_tokens=special))
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompts = body.prompts()
        gen = await submit(rid, prompts, body, body.max_tokens, body.add_special_tokens)
        count = len(gen.request_ids)

        def chunk(choices: list[CompletionChoice], use: Usage | None = None) -> str:
            return sse(
                CompletionResponse(
                    id=rid, created=created, model=model_name, choices=choices, usage=use
                )
            )

        if body.stream:

            def choice(d: Delta) -> CompletionChoice:
                return CompletionChoice(
                    index=d.index,
                    text=d.text,
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )

            events = stream_events(gen, count, body.include_usage, body.n, chunk, choice)
            return stream_response(events, gen)

        choices = await collect(gen, request, count)
        if choices is None:
            return Response(status_code=499)
        out = CompletionResponse(
            id=rid,
            created=created,
            model=model_name,
            choices=[
                CompletionChoice(
                    index=i, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason
                )
                for i, c in enumerate(choices)
            ],
            usage=usage(choices, body.n),
        )
        return JSONResponse(out.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        text = chat_text(body.messages, body.add_generation_prompt)
        gen = await submit(rid, [text], body, body.max_output_tokens, body.add_special_tokens)
        count = len(gen.request_ids)

        def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=rid, created=created, model=model_name, choices=choices, usage=use
                )
            )

        if body.stream:

            def choice(d: Delta) -> ChatChunkChoice:
                return ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text if d.text else None),
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )

            roles = [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(count)
            ]
            events = stream_events(gen, count, body.include_usage, body.n, chunk, choice, roles)
            return stream_response(events, gen)

        choices = await collect(gen, request, count)
        if choices is None:
            return Response(status_code=499)
        out = ChatCompletionResponse(
            id=rid,
            created=created,
            model=model_name,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for i, c in enumerate(choices)
            ],
            usage=usage(choices, body.n),
        )
        return JSONResponse(out.model_dump())

    return app
