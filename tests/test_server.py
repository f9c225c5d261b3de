"""The OpenAI server on loopback, driven by the official `openai` client and raw HTTP.

One server for the module, in a thread, over the session's engine (one model load); the engine is
left idle with no KV block in use when the module ends.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from longserve.serve.app import create_app

from .conftest import assert_no_leaks

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def base_url(llm):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = uvicorn.Config(create_app(llm.engine, MODEL), log_level="warning", lifespan="on")
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)
    sock.close()
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(base_url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels other than the state of a block dropped)."""
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            state = s.labels.get("state")
            out[s.name + (f"[{state}]" if state else "")] = s.value
    return out


def wait_idle(base_url: str, timeout: float = 20) -> dict[str, float]:
    """Wait until nothing runs or waits; return the metrics then."""
    deadline = time.time() + timeout
    while True:
        m = metrics(base_url)
        idle = m["longserve:num_requests_running"] == m["longserve:num_requests_waiting"] == 0
        if idle or time.time() > deadline:
            return m
        time.sleep(0.1)


def n_tokens(base_url: str, **body) -> int:
    r = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def counts(u) -> tuple[int, int, int]:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def test_health_models_tokenize(base_url, client, llm):
    assert httpx.get(f"{base_url}/health").status_code == 200
    [card] = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == 8192
    assert n_tokens(base_url, prompt="hi") == 1
    r = httpx.post(f"{base_url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    toks = r.json()["tokens"]
    assert r.json()["count"] == len(toks) > 10
    # the model's own chat template (ChatML), ending with the assistant's turn
    decoded = llm.get_tokenizer().decode(toks)
    assert "<|im_start|>user\nhi<|im_end|>" in decoded
    assert decoded.endswith("<|im_start|>assistant\n")


def test_completion_usage_and_streaming(base_url, client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, **GREEDY)
    [c] = out.choices
    assert c.finish_reason == "length" and c.text
    u = out.usage
    assert u.completion_tokens == 8 and u.prompt_tokens == n_tokens(base_url, prompt=PROMPT)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *body, last = chunks
    assert "".join(ch.choices[0].text for ch in body) == c.text
    assert [ch.choices[0].finish_reason for ch in body].count("length") == 1
    assert last.choices == [] and counts(last.usage) == counts(u)
    assert all(ch.usage is None for ch in body)


def test_chat_streaming_and_not(base_url, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, temperature=0
    )
    [c] = out.choices
    assert c.message.role == "assistant" and c.message.content
    assert out.usage.prompt_tokens == n_tokens(base_url, messages=messages)
    assert 1 <= out.usage.completion_tokens <= 12
    assert c.finish_reason == ("length" if out.usage.completion_tokens == 12 else "stop")

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert counts(chunks[-1].usage) == counts(out.usage)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32  # 2 blocks of the 1st call


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = text[: text.index(stop)]
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY
    )
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    chunks = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, stop=stop, stream=True, **GREEDY
    )
    assert "".join(ch.choices[0].text for ch in chunks) == cut


def test_n_choices(base_url, client):
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # seeds 7, 8, 9
    assert out.usage.completion_tokens == 18
    assert out.usage.prompt_tokens == n_tokens(base_url, prompt=PROMPT)  # the prompt counts once
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    # two prompts x n=2, streamed: choice i*n + j, each finishing once
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=[PROMPT, "Water boils at"], max_tokens=4, n=2, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    texts, finished = {}, []
    for ch in chunks[:-1]:
        [c] = ch.choices
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            finished.append(c.index)
    assert sorted(finished) == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy
    usage = chunks[-1].usage
    assert usage.completion_tokens == 16
    assert usage.prompt_tokens == n_tokens(base_url, prompt=PROMPT) + n_tokens(
        base_url, prompt="Water boils at"
    )


BAD = [
    # (path, body or raw text, status, param)
    ("/v1/completions", {"prompt": "word " * 9000, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 9000}, 400, None),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", '{"model": "smollm2-135m", "prompt": ', 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, None),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400, "top_p"),
    ("/tokenize", {}, 400, None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input(base_url, client, path, body, status, param):
    kw = {"content": body} if isinstance(body, str) else {"json": {"model": MODEL, **body}}
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{base_url}{path}", headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **GREEDY)
    assert out.usage.completion_tokens == 2


def test_bad_input_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert e.value.response.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPT)
    assert e.value.response.json()["error"]["code"] == "model_not_found"


def test_disconnect_aborts_and_frees_blocks(base_url):
    # long enough (1500 tokens) that only an abort ends it within the wait
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"]
    m = wait_idle(base_url)
    assert m["longserve:num_requests_running"] == 0
    assert m["longserve:kv_cache_blocks[in_use]"] == 0

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=1.0)
    m = wait_idle(base_url)
    assert m["longserve:num_requests_running"] == 0
    assert m["longserve:kv_cache_blocks[in_use]"] == 0
    assert m["longserve:kv_cache_usage_perc"] == 0


def test_metrics(base_url):
    m = wait_idle(base_url)
    assert m["longserve:kv_cache_blocks[in_use]"] == 0 and m["longserve:kv_cache_usage_perc"] == 0
    assert m["longserve:time_to_first_token_seconds_count"] > 10
    assert m["longserve:inter_token_latency_seconds_count"] > 10
    assert m["longserve:e2e_request_latency_seconds_count"] > 10
    assert m["longserve:prefix_cache_hits_total"] > 0  # the same prompt came many times
    assert m["longserve:prefix_cache_queries_total"] >= m["longserve:prefix_cache_hits_total"]
    assert m["longserve:generation_tokens_total"] > m["longserve:e2e_request_latency_seconds_count"]
