"""The HTTP API's input checks, error shape and stop-string streaming, in-process with a fake backend."""

from __future__ import annotations

import json

import httpx
import pytest

from fluxion_dist.config.schema import ServerConfig
from fluxion_dist.model.tokenizer import ByteTokenizer
from fluxion_dist.server.app import _Detokenizer, build_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class FakeBackend:
    """Yields a scripted completion as byte tokens."""

    def __init__(self, text: bytes = b"hello STOP world") -> None:
        self.tokens, self.seen, self.finished_ids = list(text), [], []

    async def generate(self, request_id, prompt, params):
        self.seen.append((prompt, params))
        for t in self.tokens[:params.max_tokens]:
            yield t

    def finished(self, request_id):
        self.finished_ids.append(request_id)

    async def health(self):
        return {"healthy": True}

    def metrics_text(self):
        return b""


def _client(backend=None, **cfg):
    app = build_app(ServerConfig(max_prompt_tokens=64, **cfg), ByteTokenizer(), backend or FakeBackend())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _body(**kw):
    return {"model": "fluxion-tiny", "prompt": "hi", "temperature": 0, **kw}


async def _post(client, body=None, content=None):
    if content is not None:
        return await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    return await client.post("/v1/completions", json=body)


def _assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("body, param", [
    (_body(seed=2**64), "seed"), (_body(seed=-1), "seed"), (_body(temperature=1e-45), "temperature"),
    (_body(top_p=0), "top_p"), (_body(top_p=1.5), "top_p"), (_body(stop=""), "stop"),
    (_body(stop=["a", "b", "c", "d", "e"]), "stop"), (_body(prompt=[True, False]), None),
    (_body(prompt=[1.5]), None), (_body(prompt=[300]), "prompt"),
    (_body(logprobs=1), "logprobs"), (_body(echo=True), "echo"), (_body(best_of=2), "best_of"),
    (_body(suffix="x"), "suffix"), (_body(presence_penalty=0.5), "presence_penalty"),
    (_body(frequency_penalty=1), "frequency_penalty"), (_body(n=2), "n"),
])
async def test_client_mistakes_are_400_naming_the_parameter(body, param):
    async with _client() as c:
        _assert_openai_error(await _post(c, body), 400, param)


async def test_nan_temperature_and_non_utf8_and_surrogates_are_400():
    async with _client() as c:
        _assert_openai_error(await _post(c, content=b'{"model":"fluxion-tiny","prompt":"x","temperature":NaN}'), 400)
        _assert_openai_error(await _post(c, content=b'{"model":"fluxion-tiny","prompt":"\xff\xfe"}'), 400)
        _assert_openai_error(await _post(c, content=b'{"model":"fluxion-tiny","prompt":"a\\ud800b"}'), 400, "prompt")
        _assert_openai_error(await _post(c, content=b"{not json"), 400)


async def test_sampler_accepted_values_pass():
    backend = FakeBackend()
    async with _client(backend) as c:
        r = await _post(c, _body(seed=2**63 - 1, temperature=0.5, top_p=1, max_tokens=3, logprobs=None,
                                 best_of=1, presence_penalty=0))
    assert r.status_code == 200, r.text
    assert backend.seen[0][1].seed == 2**63 - 1


async def test_body_limit_413_and_char_limit_before_tokenizing():
    backend = FakeBackend()
    async with _client(backend) as c:
        _assert_openai_error(await _post(c, _body(prompt="x" * (2 << 20))), 413)
        r = await _post(c, _body(prompt="x" * 5000))  # over 64 tokens * 16 chars: refused untokenized
        _assert_openai_error(r, 400, "prompt")
        assert "characters" in r.json()["error"]["message"]
    assert backend.seen == []


async def test_404_405_in_openai_shape():
    async with _client() as c:
        _assert_openai_error(await c.get("/nope"), 404)
        _assert_openai_error(await c.get("/v1/completions"), 405)


async def _stream_text(c, body):
    text, finish = "", None
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev["choices"]:
                    text += ev["choices"][0]["text"]
                    finish = ev["choices"][0]["finish_reason"] or finish
    return text, finish


@pytest.mark.parametrize("stop", [["STOP"], ["ST"], ["STX"], ["o w", "zzz"], ["world"]])
async def test_stop_strings_identical_in_stream_and_not(stop):
    async with _client() as c:
        plain = (await _post(c, _body(stop=stop, max_tokens=50))).json()["choices"][0]
        streamed, finish = await _stream_text(c, _body(stop=stop, max_tokens=50))
    assert streamed == plain["text"]
    assert finish == plain["finish_reason"]


def test_stream_holds_back_only_a_possible_stop_prefix():
    d = _Detokenizer(ByteTokenizer(), ["STOP"])
    out = [d.push(t) for t in b"ab ST"]
    assert "".join(out) == "ab "  # "ST" may start the stop string
    assert d.push(ord("x")) == "STx"


def test_genuine_replacement_character_is_not_withheld():
    d = _Detokenizer(ByteTokenizer(), [])
    sent = "".join(d.push(t) for t in b"a\xff" + b"bcdef")
    assert sent.startswith("a\ufffd")
    d2 = _Detokenizer(ByteTokenizer(), [])
    assert "".join(d2.push(t) for t in "é".encode()) == "é"  # an incomplete character is held, then sent


async def test_include_usage():
    async with _client() as c:
        async with c.stream("POST", "/v1/completions",
                            json=_body(stream=True, max_tokens=4, stream_options={"include_usage": True})) as r:
            events = [json.loads(ln[6:]) async for ln in r.aiter_lines()
                      if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert events[-1]["usage"]["completion_tokens"] == 4 and events[-1]["choices"] == []


async def test_non_streaming_client_disconnect_closes_the_backend_stream():
    import asyncio

    closed = asyncio.Event()

    class Slow(FakeBackend):
        async def generate(self, request_id, prompt, params):
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield 65
            finally:
                closed.set()

    app = build_app(ServerConfig(max_prompt_tokens=64), ByteTokenizer(), Slow())
    body = json.dumps(_body(max_tokens=1000)).encode()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(0.2)  # the client hangs up mid-generation
        return {"type": "http.disconnect"}

    async def send(_):
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert closed.is_set()
