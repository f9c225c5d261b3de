"""AsyncEngine: the LLMEngine stepping in its own thread while an asyncio server comes and goes.

One thread owns the engine. Everything that touches it (adding and aborting requests, tokenizing,
reading counters) is a command that thread runs between steps, so the event loop never waits on
torch work and the engine needs no locks. Each request's new text reaches its caller through an
asyncio queue, decoded incrementally (vLLM's prefix/read offsets: a token that ends inside a UTF-8
character waits for the next one) and held back by the longest stop string's length minus one, so
a stream never shows text that a stop string later cuts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from longserve.engine.llm import LLMEngine, Prompt
from longserve.engine.request import Request
from longserve.engine.sampling import SamplingParams

log = logging.getLogger("longserve")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a failed step or shutdown); nothing more can be generated."""


@dataclass
class Delta:
    """What one step produced for one request of a call: new text, and its counts so far."""

    index: int
    text: str
    num_output_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _Stream:
    req: Request
    index: int
    out: asyncio.Queue
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # decoded so far
    sent: int = 0  # characters of text already delivered
    last_token_time: float = 0.0


class Generation:
    """The requests of one API call (prompts x n): iterate for their deltas; abort() cancels."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.engine, self.request_ids = engine, request_ids
        self.out: asyncio.Queue = asyncio.Queue()
        self.live = set(range(len(request_ids)))

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Delta:
        if not self.live:
            raise StopAsyncIteration
        d = await self.out.get()
        if isinstance(d, BaseException):
            self.live.clear()
            raise d
        if d.finish_reason is not None:
            self.live.discard(d.index)
        return d

    def abort(self) -> None:
        """Abort the requests not finished yet (safe to call twice, or after a failed add)."""
        for i in self.live:
            self.engine.abort(self.request_ids[i])
        self.live.clear()


class AsyncEngine:
    """Owns an LLMEngine and its stepping thread; `on_token(req, inter_token_latency)` is called
    on that thread for every token a request gets (None as the latency of the first)."""

    def __init__(
        self,
        engine: LLMEngine,
        on_token: Callable[[Request, float | None], None] | None = None,
    ) -> None:
        self.engine, self.on_token = engine, on_token
        self.error: BaseException | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start stepping; call it from the event loop that consumes the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="longserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort what is left and stop the thread; the engine is left idle and reusable."""
        self._calls.put(None)
        if self._thread is not None:
            self._thread.join()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread between steps; its result or exception comes back.
        If the caller is cancelled before the thread gets to it, fn does not run."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, args, fut))
        return await asyncio.wrap_future(fut)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (queued; returns at once)."""
        self._calls.put((self._abort, (request_id,), concurrent.futures.Future()))

    async def submit(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: list[SamplingParams],
        add_special_tokens: bool = True,
    ) -> Generation:
        """Queue one request per prompt, all or none (bad input raises ValueError, adds nothing).
        Request i is `{request_id}-{i}` and its deltas carry index i."""
        gen = Generation(self, [f"{request_id}-{i}" for i in range(len(prompts))])
        arrival = time.time()
        try:
            await self.call(self._add, gen, prompts, params, add_special_tokens, arrival)
        except BaseException:
            gen.abort()
            raise
        return gen

    # --- on the engine thread ---

    def _add(
        self,
        gen: Generation,
        prompts: list[Prompt],
        params: list[SamplingParams],
        add_special_tokens: bool,
        arrival: float,
    ) -> None:
        tok, added = self.engine.tokenizer, []
        try:
            for rid, prompt, sp in zip(gen.request_ids, prompts, params, strict=True):
                if isinstance(prompt, str) and not add_special_tokens and tok is not None:
                    ids = tok.encode(prompt, add_special_tokens=False)
                    prompt = {"prompt": prompt, "prompt_token_ids": ids}
                req = self.engine.add_request(prompt, sp, rid)
                req.metrics.arrival_time = arrival
                added.append(req)
        except BaseException:
            for req in added:
                self.engine.abort(req.request_id)
            raise
        for i, req in enumerate(added):
            self._streams[req.request_id] = _Stream(req, i, gen.out)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._streams.pop(request_id, None)

    def _run(self) -> None:
        while True:
            idle = self.error is not None or not self.engine.has_unfinished()
            cmds = [self._calls.get()] if idle else []
            while True:
                try:
                    cmds.append(self._calls.get_nowait())
                except queue.Empty:
                    break
            stopping = None in cmds
            if stopping:
                self._fail_all(EngineDeadError("the engine was stopped"))
                self.error = self.error or EngineDeadError("stopped")
            for cmd in cmds:
                if cmd is None:
                    continue
                fn, args, fut = cmd
                if not fut.set_running_or_notify_cancel():
                    continue
                if self.error is not None:
                    fut.set_exception(EngineDeadError(f"the engine stopped: {self.error}"))
                    continue
                try:
                    fut.set_result(fn(*args))
                except Exception as e:
                    fut.set_exception(e)
            if stopping:
                return
            if self.error is None and self.engine.has_unfinished():
                try:
                    self._publish(self.engine.step())
                except Exception as e:
                    log.exception("engine step failed; the engine stops")
                    self.error = e
                    self._fail_all(EngineDeadError(f"the engine stopped: {e}"))

    def _fail_all(self, err: BaseException) -> None:
        """Abort every request we track and hand err to its caller."""
        outs = []
        for rid, s in self._streams.items():
            with contextlib.suppress(Exception):  # a failed step may have left it inconsistent
                self.engine.abort(rid)
            outs.append((s.out, err))
        self._streams.clear()
        self._deliver(outs)

    def _publish(self, reqs: list[Request]) -> None:
        now, outs = time.time(), []
        for req in reqs:
            s = self._streams.get(req.request_id)
            if s is None:
                continue
            if self.on_token is not None:
                self.on_token(req, now - s.last_token_time if s.last_token_time else None)
            s.last_token_time = now
            s.text += self._decode(s)
            if req.finished:
                # the engine's text is authoritative: cut at a stop string, special tokens skipped
                text = req.text
                del self._streams[req.request_id]
            else:
                hold = max((len(x) for x in req.params.stop), default=1) - 1
                text = s.text[: max(s.sent, len(s.text) - hold)]
            delta, s.sent = text[s.sent :], len(text)
            if delta or req.finished:
                outs.append((s.out, self._delta(s.index, delta, req)))
        self._deliver(outs)

    def _decode(self, s: _Stream) -> str:
        """Text of the tokens since the last call, decoded with a few tokens of context."""
        ids, skip = s.req.output_token_ids, s.req.params.skip_special_tokens
        prefix = self.engine.detokenize(ids[s.prefix_offset : s.read_offset], skip)
        full = self.engine.detokenize(ids[s.prefix_offset :], skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.prefix_offset, s.read_offset = s.read_offset, len(ids)
            return full[len(prefix) :]
        return ""

    @staticmethod
    def _delta(index: int, text: str, req: Request) -> Delta:
        return Delta(
            index=index,
            text=text,
            num_output_tokens=len(req.output_token_ids),
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
        )

    def _deliver(self, outs: list[tuple[asyncio.Queue, Any]]) -> None:
        if outs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, outs)


def _put_all(outs: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in outs:
        q.put_nowait(item)
