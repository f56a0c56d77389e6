"""The HTTP API's input checks, error shape and stop-string streaming, in-process with a fake backend."""

from __future__ import annotations

import json

import httpx
import pytest

from fluxion_dist.config.schema import ServerConfig, SparseConfig
from fluxion_dist.model.tokenizer import ByteTokenizer
from fluxion_dist.policy.request import RequestSparse
from fluxion_dist.server.app import build_app
from fluxion_dist.server.detokenizer import Detokenizer
from fluxion_dist.sampling import TokenLogprobs
from fluxion_dist.server.stream import GeneratedToken

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class FakeBackend:
    """Yields a scripted completion as byte tokens."""

    def __init__(self, text: bytes = b"hello STOP world") -> None:
        self.tokens, self.seen, self.finished_ids, self.scored = list(text), [], [], []

    async def generate(self, request_id, prompt, params, sparse=None):
        self.seen.append((prompt, params, sparse))
        for i, t in enumerate(self.tokens[:params.max_tokens]):
            if params.logprobs is None:
                yield t
            else:  # a made-up distribution: the token at -0.1 * i, then n alternatives below it
                alts = tuple((t + 1 + k, -1.0 - k) for k in range(params.logprobs))
                yield GeneratedToken(t, None, TokenLogprobs(t, -0.1 * i, alts))

    async def prompt_logprobs(self, request_id, prompt, n):
        self.scored.append((prompt, n))
        return [None] + [TokenLogprobs(t, -0.5 - i, tuple((t ^ 1, -3.0) for _ in range(min(n, 1))))
                         for i, t in enumerate(prompt[1:])]

    def finished(self, request_id):
        self.finished_ids.append(request_id)

    async def health(self):
        return {"healthy": True}

    def metrics_text(self):
        return b""


def _client(backend=None, sparse=None, **cfg):
    app = build_app(ServerConfig(max_prompt_tokens=64, **cfg), ByteTokenizer(), backend or FakeBackend(), sparse)
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
    (_body(logprobs=6), "logprobs"), (_body(logprobs=-1), "logprobs"), (_body(logprobs=True), "logprobs"),
    (_body(max_tokens=0), None), (_body(prompt=[[1, 2], [3]]), None), (_body(prompt=[[]]), None),
    (_body(best_of=2), "best_of"),
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
    d = Detokenizer(ByteTokenizer(), ["STOP"])
    out = [d.push(t) for t in b"ab ST"]
    assert "".join(out) == "ab "  # "ST" may start the stop string
    assert d.push(ord("x")) == "STx"


def test_genuine_replacement_character_is_not_withheld():
    d = Detokenizer(ByteTokenizer(), [])
    sent = "".join(d.push(t) for t in b"a\xff" + b"bcdef")
    assert sent.startswith("a\ufffd")
    d2 = Detokenizer(ByteTokenizer(), [])
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
        async def generate(self, request_id, prompt, params, sparse=None):
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


class FractionBackend(FakeBackend):
    """The prefill's token as a plain id, then decode steps that report the KV fraction they read."""

    def __init__(self, fractions):
        super().__init__()
        self.fractions = fractions

    async def generate(self, request_id, prompt, params, sparse=None):
        self.seen.append((prompt, params, sparse))
        yield 104
        for f in self.fractions[:params.max_tokens - 1]:
            yield GeneratedToken(105, f)


QUEST = SparseConfig(policy="quest_gpu", budget=0.05, max_request_budget=0.25)


@pytest.mark.parametrize("sparse, needle", [
    ({"budget": 0.9}, "sparse.budget 0.9 is above this deployment's cap 0.25"),
    ({"budget": 0}, "sparse.budget"), ({"budget": True}, "sparse.budget"), ({"budget": "0.1"}, "sparse.budget"),
    ({"policy": "fluxion"}, "sparse.policy"), ({"policy": 3}, "sparse.policy"),
    ({"policy": "full", "extra": 1}, "extra"), ("full", "sparse"), ([0.1], "sparse"),
])
async def test_bad_sparse_is_400_naming_the_field(sparse, needle):
    backend = FakeBackend()
    async with _client(backend, QUEST) as c:
        r = await _post(c, _body(sparse=sparse))
    _assert_openai_error(r, 400, "sparse")
    assert needle in r.json()["error"]["message"], r.text
    assert backend.seen == []


@pytest.mark.parametrize("sparse, want", [
    (None, None), ({"budget": 0.2}, RequestSparse("quest_gpu", 0.2)),
    ({"policy": "full"}, RequestSparse("full", 1.0)), ({}, RequestSparse("quest_gpu", 0.05)),
])
async def test_sparse_reaches_the_backend_and_comes_back_in_usage(sparse, want):
    fractions = [0.031, 0.047, 0.052, 0.018, 0.06, 0.044, 0.039, 0.071, 0.025, 0.033, 0.058, 0.049, 0.012, 0.066]
    backend = FractionBackend(fractions)
    body = _body(max_tokens=15) if sparse is None else _body(max_tokens=15, sparse=sparse)
    async with _client(backend, QUEST) as c:
        plain = await _post(c, body)
        async with c.stream("POST", "/v1/completions",
                            json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(ln[6:]) async for ln in r.aiter_lines()
                      if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert plain.status_code == 200, plain.text
    assert [seen[2] for seen in backend.seen] == [want, want]
    policy, budget = (want.policy, want.budget) if want is not None else ("quest_gpu", 0.05)
    mean = sum(fractions) / len(fractions)
    for got in (plain.json()["usage"]["sparse"], events[-1]["usage"]["sparse"]):
        assert got["policy"] == policy and got["budget"] == budget
        assert got["kv_fraction_read"] == pytest.approx(mean, rel=1e-12)
    assert plain.json()["choices"][0]["text"] == "h" + "i" * 14


async def test_a_full_deployment_reports_budget_one_and_no_fraction_for_one_token():
    async with _client(FractionBackend([])) as c:  # default SparseConfig: policy full
        r = await _post(c, _body(max_tokens=1))
    assert r.json()["usage"]["sparse"] == {"policy": "full", "budget": 1.0, "kv_fraction_read": None}


async def test_echo_prepends_the_prompt_in_stream_and_not():
    async with _client() as c:
        plain = (await _post(c, _body(prompt="Hi! ", echo=True, max_tokens=5, stop=["STOP"]))).json()
        streamed, finish = await _stream_text(c, _body(prompt="Hi! ", echo=True, max_tokens=5, stop=["STOP"]))
        ids = (await _post(c, _body(prompt=[72, 105], echo=True, max_tokens=2))).json()
    assert plain["choices"][0]["text"] == "Hi! hello" == streamed and finish == "length"
    assert ids["choices"][0]["text"] == "Hihe"


async def test_generated_token_logprobs_in_openai_shape():
    async with _client() as c:
        body = (await _post(c, _body(max_tokens=6, logprobs=2))).json()
        chunks = []
        async with c.stream("POST", "/v1/completions", json=_body(max_tokens=6, logprobs=2, stream=True)) as r:
            async for ln in r.aiter_lines():
                if ln.startswith("data: ") and ln != "data: [DONE]":
                    chunks.append(json.loads(ln[6:])["choices"][0])
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list("hello ") and body["choices"][0]["text"] == "hello "
    assert lp["token_logprobs"] == pytest.approx([-0.1 * i for i in range(6)])
    assert lp["text_offset"] == list(range(6))
    # the chosen token and the n alternatives, likeliest first
    assert list(lp["top_logprobs"][1]) == ["e", "f", "g"] and lp["top_logprobs"][1]["f"] == -1.0
    streamed = [t for ch in chunks if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]
    assert "".join(ch["text"] for ch in chunks) == "hello "


async def test_echo_logprobs_max_tokens_0_scores_the_prompt_as_lm_eval_asks():
    backend = FakeBackend()
    async with _client(backend) as c:
        # lm-evaluation-harness's local-completions: token ids in a one-element batch
        r = await _post(c, {"model": "fluxion-tiny", "prompt": [[72, 105, 33]], "echo": True, "logprobs": 1,
                            "max_tokens": 0, "temperature": 0})
        one = await _post(c, _body(prompt="Hi!", echo=True, logprobs=1, max_tokens=1))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "Hi!" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["H", "i", "!"]
    assert choice["logprobs"]["token_logprobs"] == [None, -0.5, -1.5]
    assert choice["logprobs"]["top_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][2]["!"] == -1.5
    assert r.json()["usage"]["completion_tokens"] == 0
    assert backend.scored[0] == ([72, 105, 33], 1) and len(backend.seen) == 1  # max_tokens 0: no generation
    lp = one.json()["choices"][0]["logprobs"]
    # a text prompt is tokenized with its BOS, which scores (and prints) as the first token
    assert lp["tokens"] == ["", "H", "i", "!", "h"] and lp["token_logprobs"][:4] == [None, -0.5, -1.5, -2.5]
    assert one.json()["choices"][0]["text"] == "Hi!h"


async def test_chat_completions_is_400_saying_why():
    async with _client() as c:
        r = await c.post("/v1/chat/completions", json={"model": "fluxion-tiny",
                                                       "messages": [{"role": "user", "content": "hi"}]})
    _assert_openai_error(r, 400, "messages")
    assert "chat template" in r.json()["error"]["message"]


async def test_openapi_schema_is_not_served_when_a_key_is_set():
    async with _client(api_key="s3cret") as c:
        assert (await c.get("/openapi.json")).status_code == 404
        assert (await c.post("/v1/completions", json=_body())).status_code == 401
    async with _client() as c:
        assert (await c.get("/openapi.json")).status_code == 200
