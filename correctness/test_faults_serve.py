"""Faults at the serving endpoint, driven through real HTTP on 127.0.0.1 against a tiny random model.

A request's failure stays with that request (400 naming the field, never a dead engine thread); an engine thread that
does die is reported by the health endpoints (503) and fails every waiting request instead of leaving it hanging; the
socket is not trusted (timeouts, Content-Length checked against the body and a cap); the body is validated field by
field (ints are ints, bounded); other methods get a JSON 405; a batch is validated before anything is generated; a
client that disconnects cancels its generation; the Host (and Origin) header must name this server. A bounded
hypothesis fuzz of bodies and headers ends each case in a correct completion or a clear 4xx, and the server serves
afterwards. The engine and sampling faults behind these (huge seeds, vanishing temperatures, NaN rows) and the serve
CLI's one-line load errors are checked here too.
"""
from __future__ import annotations

import http.client
import io
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fixtures.serve import tiny_model
from impl import backend
from impl.serve.engine import Engine, EngineConfig
from impl.serve.sampling import SamplingParams, sample
from impl.serve.server import ServerLimits, make_server

DEV = "cuda" if backend.ON_GPU else "cpu"
MODEL = tiny_model(device=DEV)
CONTEXT = 64
LIMITS = ServerLimits(request_timeout_s=1.0, max_body_bytes=4096, max_prompts=4)


class ByteTokenizer:
    """Text -> one token per UTF-8 byte (id = byte mod 97): enough to send text prompts through the tiny model."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [b % 97 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(33 + i) for i in ids)


def new_engine(**cfg) -> Engine:
    return Engine(MODEL, EngineConfig(**{"page_size": 4, "max_batch": 4, "max_seq_len": CONTEXT, **cfg}),
                  tokenizer=ByteTokenizer())


def alone(prompt, n: int) -> list[int]:
    """Greedy tokens of one prompt through a fresh engine (what the server must return for temperature 0)."""
    return new_engine().generate([prompt], SamplingParams(max_new_tokens=n))[0].tokens


class Served:
    """A server on an ephemeral port in a background thread, with plain and raw-socket clients."""

    def __init__(self, engine: Engine, limits: ServerLimits = LIMITS) -> None:
        self.engine = engine
        self.server = make_server(engine, "tiny", port=0, limits=limits)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.loop.close()
        self.server.server_close()

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 10) -> tuple[int, dict, dict | None]:
        """(status, headers, JSON body or None) through http.client."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        try:
            conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            raw = r.read()
            return r.status, dict(r.getheaders()), (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def post(self, body, **kw) -> tuple[int, dict | None]:
        code, _, reply = self.request("POST", "/v1/completions", body, **kw)
        return code, reply

    def raw(self, data: bytes, *, half_close: bool = False, timeout: float = 10) -> tuple[int | None, bytes]:
        """Send bytes as they are; (status or None if the server closed without a reply, body). A server that
        neither answers nor closes within ``timeout`` fails the test."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass
            except socket.timeout:
                pytest.fail(f"no reply and no close within {timeout} s for {data[:80]!r}")
        reply = b"".join(chunks)
        if not reply:
            return None, b""
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split()[1]), body


def post_bytes(host: str, body: bytes, extra: str = "", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {n}\r\n{extra}\r\n").encode() + body


def error_message(body: bytes | dict | None) -> str:
    reply = json.loads(body) if isinstance(body, bytes) else body
    assert isinstance(reply, dict) and isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    return reply["error"]["message"]


@pytest.fixture(scope="module")
def srv():
    s = Served(new_engine())
    yield s
    s.close()


# ---- one request's failure is that request's -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_seed_beyond_64_bits_fails_that_request_alone(srv):
    code, reply = srv.post({"prompt": "Hi", "seed": 2**64, "temperature": 1}, timeout=5)
    assert code == 400 and "seed" in error_message(reply)
    code, reply = srv.post({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}, timeout=20)
    assert code == 200 and reply["choices"][0]["token_ids"] == alone([1, 2, 3], 4)
    assert srv.request("GET", "/health", timeout=5)[0] == 200
    code, reply = srv.post({"prompt": [1], "max_tokens": 2, "temperature": 1, "seed": 2**64 - 1}, timeout=20)
    assert code == 200 and len(reply["choices"][0]["token_ids"]) == 2


BODY = '{"prompt": [1, 2], "max_tokens": 2, "temperature": 0, %s}'
BAD_FIELDS = [  # (JSON fragment, word the message must contain)
    ('"seed": 18446744073709551616', "seed"), ('"seed": -1', "seed"), ('"seed": 1e400', "seed"),
    ('"seed": "3"', "seed"), ('"seed": 1.9', "seed"), ('"seed": true', "seed"), ('"seed": 1.0', "seed"),
    ('"max_tokens": 1e400', "max_tokens"), ('"max_tokens": "3"', "max_tokens"), ('"max_tokens": 1.9', "max_tokens"),
    ('"max_tokens": true', "max_tokens"), ('"max_tokens": 0', "max_tokens"), ('"max_tokens": -1', "max_tokens"),
    ('"max_tokens": 100000000000000000000', "max_tokens"), ('"max_tokens": [2]', "max_tokens"),
    ('"temperature": "hot"', "temperature"), ('"temperature": -0.5', "temperature"),
    ('"temperature": true', "temperature"), ('"temperature": 1e400', "temperature"),
    ('"temperature": NaN', "temperature"), ('"top_p": 0', "top_p"), ('"top_p": 1.5', "top_p"),
    ('"top_p": "x"', "top_p"), ('"top_p": NaN', "top_p"), ('"top_p": -Infinity', "top_p"),
    ('"stream": true', "stream"), ('"n": 2', "'n'"), ('"stop": ["x"]', "'stop'"),
]
BAD_PROMPTS = ["3", "[]", "[[]]", '[1, "a"]', "[[1], 2]", '{"a": 1}', "[true]", "null", '""', "[1.5]", "[-1]",
               "[97]", "[1e400]", '["a", [1]]', "[" + ", ".join(["1"] * CONTEXT) + "]", '["ok", ""]',
               "[[1], [2], [3], [4], [5]]"]
BAD_BODIES = ["[]", "null", '"prompt"', "3", "true", '{"prompt": [1]', "{'prompt': [1]}", "", "\xff\xfe",
              "[" * 2000 + "]" * 2000, '{"prompt": [1]} {}']


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fragment,word", BAD_FIELDS)
def test_a_bad_sampling_field_gets_400_naming_it(srv, fragment, word):
    code, body = srv.raw(post_bytes(srv.host, (BODY % fragment).encode()), timeout=5)
    assert code == 400, (fragment, body)
    assert word in error_message(body), fragment


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prompt", BAD_PROMPTS)
def test_a_bad_prompt_gets_400(srv, prompt):
    code, body = srv.raw(post_bytes(srv.host, ('{"prompt": %s, "max_tokens": 2}' % prompt).encode()), timeout=5)
    assert code == 400, (prompt, body)
    assert "prompt" in error_message(body)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_a_body_that_is_not_one_json_object_gets_400(srv, text):
    code, body = srv.raw(post_bytes(srv.host, text.encode("utf-8", "surrogateescape")), timeout=5)
    assert code == 400, (text[:40], body)
    error_message(body)


@pytest.mark.timeout(60)
def test_wrong_model_is_404_and_a_valid_request_still_works(srv):
    code, reply = srv.post({"prompt": [1], "model": "gpt-4"}, timeout=5)
    assert code == 404 and "gpt-4" in error_message(reply)
    code, reply = srv.post({"prompt": [[4, 5], "ab"][0], "model": "tiny", "max_tokens": None, "temperature": 0,
                            "seed": None, "top_p": 1, "stream": False, "user": "me"}, timeout=20)
    assert code == 200 and reply["choices"][0]["token_ids"] == alone([4, 5], 16)


@pytest.mark.timeout(60)
def test_a_failing_step_fails_the_requests_in_flight_not_the_server():
    engine = new_engine()
    s = Served(engine)
    real = engine.step
    try:
        def exploding_step():
            raise RuntimeError("forward exploded")

        engine.step = exploding_step
        code, reply = s.post({"prompt": [1, 2], "max_tokens": 3}, timeout=10)
        assert code == 500 and "forward exploded" in error_message(reply)
        engine.step = real
        assert s.request("GET", "/health", timeout=5)[0] == 200
        code, reply = s.post({"prompt": [1, 2], "max_tokens": 3, "temperature": 0}, timeout=20)
        assert code == 200 and reply["choices"][0]["token_ids"] == alone([1, 2], 3)
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_a_dead_engine_thread_fails_waiters_and_health():
    """The step and its error handling both fail: the thread dies, and says so instead of leaving clients hanging."""
    engine = new_engine()
    s = Served(engine)
    try:
        assert s.request("GET", "/health", timeout=5)[0] == 200

        def exploding_step():
            raise RuntimeError("forward exploded")

        def exploding_abort(rid, reason="aborted"):
            raise RuntimeError("abort exploded")

        engine.step, engine.abort = exploding_step, exploding_abort
        t0 = time.monotonic()
        code, reply = s.post({"prompt": [1, 2], "max_tokens": 3}, timeout=10)
        assert code in (500, 503) and "exploded" in error_message(reply)
        assert time.monotonic() - t0 < 8
        for path in ("/health", "/v1/models"):
            code, _, reply = s.request("GET", path, timeout=5)
            assert code == 503 and "engine" in error_message(reply), path
        t0 = time.monotonic()
        code, reply = s.post({"prompt": [1, 2], "max_tokens": 3}, timeout=10)
        assert code == 503 and time.monotonic() - t0 < 8
    finally:
        s.close()


# ---- the socket ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_content_length_is_checked_against_the_body_and_the_cap(srv):
    body = b'{"prompt": [1], "max_tokens": 1}'
    # longer than what was sent, then the client stops sending: 400 at once (a wait for the timeout would be 408)
    code, reply = srv.raw(post_bytes(srv.host, body, length=len(body) + 50), half_close=True, timeout=5)
    assert code == 400 and "Content-Length" in error_message(reply)
    t0 = time.monotonic()  # longer than what was sent, client keeps the socket open: timed out, 408
    code, reply = srv.raw(post_bytes(srv.host, body, length=len(body) + 50), timeout=5)
    assert code == 408 and LIMITS.request_timeout_s <= time.monotonic() - t0 < LIMITS.request_timeout_s + 10
    for length, want in [("-1", 400), ("abc", 400), ("1e3", 400), (str(10**15), 413), (str(LIMITS.max_body_bytes + 1),
                                                                                       413)]:
        code, reply = srv.raw((f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\nContent-Length: {length}\r\n"
                               "\r\n").encode() + body, timeout=5)
        assert code == want and "Content-Length" in error_message(reply), length  # not 408: nothing was awaited
    code, reply = srv.raw(f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\n\r\n".encode() + body, half_close=True)
    assert code == 411 and "Content-Length" in error_message(reply)
    code, reply = srv.raw(post_bytes(srv.host, body, extra=f"Content-Length: {len(body) + 1}\r\n"), timeout=5)
    assert code == 400 and "Content-Length" in error_message(reply)
    code, reply = srv.raw(post_bytes(srv.host, b"5\r\nhello\r\n0\r\n\r\n", extra="Transfer-Encoding: chunked\r\n"))
    assert code in (400, 411) and "Transfer-Encoding" in error_message(reply)
    assert srv.post({"prompt": [1], "max_tokens": 1}, timeout=20)[0] == 200


@pytest.mark.timeout(60)
def test_a_stalled_request_line_or_header_times_out(srv):
    for partial in (b"POST /v1/comp", f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\nContent-".encode()):
        t0 = time.monotonic()
        code, _ = srv.raw(partial, timeout=LIMITS.request_timeout_s + 15)
        assert code in (None, 408) and time.monotonic() - t0 < LIMITS.request_timeout_s + 10
    assert srv.request("GET", "/health", timeout=5)[0] == 200


@pytest.mark.timeout(60)
def test_other_methods_and_routes_get_json_errors(srv):
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        code, headers, reply = srv.request(method, "/v1/completions", {"prompt": [1]}, timeout=5)
        assert code == 405 and headers.get("Allow") == "POST" and method in error_message(reply), method
    code, headers, reply = srv.request("HEAD", "/v1/completions", timeout=5)
    assert code == 405 and reply is None and headers.get("Allow") == "POST"
    code, headers, reply = srv.request("GET", "/v1/completions", timeout=5)
    assert code == 405 and headers.get("Allow") == "POST"
    code, headers, reply = srv.request("POST", "/v1/models", {}, timeout=5)
    assert code == 405 and headers.get("Allow") == "GET"
    code, _, reply = srv.request("GET", "/nope", timeout=5)
    assert code == 404 and "/nope" in error_message(reply)
    code, _, reply = srv.request("GET", "/v1/models?limit=1", timeout=5)
    assert code == 200 and reply["data"][0]["id"] == "tiny"
    code, body = srv.raw(f"BREW /v1/completions HTTP/1.1\r\nHost: {srv.host}\r\n\r\n".encode(), timeout=5)
    assert code in (405, 501) and "BREW" in error_message(body)


@pytest.mark.timeout(60)
def test_the_host_and_origin_headers_must_name_this_server(srv):
    port = srv.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        code, _, _ = srv.request("GET", "/v1/models", headers={"Host": host}, timeout=5)
        assert code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
        code, _, reply = srv.request("GET", "/v1/models", headers={"Host": host}, timeout=5)
        assert code == 403 and "Host" in error_message(reply), host
        code, _, reply = srv.request("POST", "/v1/completions", {"prompt": [1]}, headers={"Host": host}, timeout=5)
        assert code == 403, host
    code, body = srv.raw(b"GET /v1/models HTTP/1.0\r\n\r\n", timeout=5)
    assert code == 400 and "Host" in error_message(body)
    code, _, reply = srv.request("POST", "/v1/completions", {"prompt": [1], "max_tokens": 1},
                                 headers={"Origin": "http://evil.example"}, timeout=5)
    assert code == 403 and "Origin" in error_message(reply)
    code, _, reply = srv.request("POST", "/v1/completions", {"prompt": [1], "max_tokens": 1},
                                 headers={"Origin": f"http://localhost:{port}"}, timeout=20)
    assert code == 200


@pytest.mark.timeout(60)
def test_a_burst_of_clients_waits_in_the_backlog_and_is_served():
    """64 clients connect while the server is not yet accepting (as under a load test's burst): the kernel must
    queue them all (a small listen backlog drops their SYNs and the load test saw resets), then each is answered."""
    n = 64
    served = Served.__new__(Served)
    served.server = make_server(new_engine(), "tiny", port=0, limits=LIMITS)
    served.port = served.server.server_address[1]
    socks = []
    try:
        for i in range(n):  # nothing accepts yet: each connection completes only if the backlog holds it
            try:
                socks.append(socket.create_connection(("127.0.0.1", served.port), timeout=2))
            except OSError as e:
                pytest.fail(f"connection {i + 1} of {n} was not queued ({type(e).__name__}: {e}); "
                            f"listen backlog {served.server.request_queue_size}")
        threading.Thread(target=served.server.serve_forever, daemon=True).start()
        for s in socks:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode())
        for s in socks:
            s.settimeout(10)
            assert s.recv(64).split()[1] == b"200"
    finally:
        for s in socks:
            s.close()
        served.close()


# ---- batches and cancellation ----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_batch_is_validated_before_anything_is_generated(srv):
    stats = dict(srv.engine.stats)
    for prompt in ([[1, 2, 3], [5, 97]], [[1, 2, 3], []], ["abc", "x" * CONTEXT], [[1, 2], "ab", 3]):
        code, reply = srv.post({"prompt": prompt, "max_tokens": 20}, timeout=10)
        assert code == 400 and "prompt" in error_message(reply), prompt
    assert srv.engine.stats == stats, "a rejected batch started generating"
    code, reply = srv.post({"prompt": [[1, 2, 3], [5, 6]], "max_tokens": 3, "temperature": 0}, timeout=20)
    assert code == 200 and [c["token_ids"] for c in reply["choices"]] == [alone([1, 2, 3], 3), alone([5, 6], 3)]


@pytest.mark.timeout(60)
def test_a_client_that_disconnects_cancels_its_generation():
    engine = new_engine()
    real = engine.step

    def slow_step():
        time.sleep(0.02)
        return real()

    engine.step = slow_step
    s = Served(engine)
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        sock.sendall(post_bytes(s.host, b'{"prompt": [1], "max_tokens": 60, "temperature": 0}'))
        deadline = time.monotonic() + 10
        while engine.stats["generated_tokens"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        generated = engine.stats["generated_tokens"]
        assert generated < 40, f"the generation ran on after its client left ({generated} tokens)"
        time.sleep(0.2)
        assert engine.stats["generated_tokens"] == generated and not engine.has_unfinished()
        assert engine.cache.allocator.num_free == engine.cache.cfg.num_pages, "pages leaked"
        code, reply = s.post({"prompt": [1, 2], "max_tokens": 2, "temperature": 0}, timeout=20)
        assert code == 200 and reply["choices"][0]["token_ids"] == alone([1, 2], 2)
    finally:
        s.close()


# ---- fuzz: generated bodies and headers ------------------------------------------------------------------------

def _ids_ok(xs) -> bool:
    return isinstance(xs, list) and 0 < len(xs) < CONTEXT and all(type(t) is int and 0 <= t < 97 for t in xs)


def _text_ok(s) -> bool:
    if not isinstance(s, str):
        return False
    try:
        return 0 < len(s.encode("utf-8")) < CONTEXT  # ByteTokenizer: one token per byte
    except UnicodeEncodeError:  # a lone surrogate
        return False


def _valid_prompt(p) -> bool:
    if _text_ok(p) or _ids_ok(p):
        return True
    return isinstance(p, list) and 0 < len(p) <= LIMITS.max_prompts and (
        all(_ids_ok(x) for x in p) or all(_text_ok(x) for x in p))


def _number(v) -> bool:
    if type(v) not in (int, float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def expected_ok(body) -> bool:
    """The endpoint's contract, restated independently of the server's code (null means absent)."""
    if not isinstance(body, dict) or "prompt" not in body or not _valid_prompt(body["prompt"]):
        return False
    known = {"prompt", "max_tokens", "temperature", "top_p", "seed", "stream", "model", "user"}
    if set(body) - known:
        return False
    get = lambda k, default: default if body.get(k) is None else body[k]  # noqa: E731
    mt, seed, t, p = get("max_tokens", 16), get("seed", 0), get("temperature", 1.0), get("top_p", 1.0)
    return (type(mt) is int and 1 <= mt <= CONTEXT and type(seed) is int and 0 <= seed < 2**64
            and _number(t) and t >= 0 and _number(p) and 0 < p <= 1 and get("stream", False) is False
            and get("model", "tiny") == "tiny" and isinstance(get("user", ""), str))


FIELDS = {
    "prompt": st.one_of(st.lists(st.integers(-2, 99), max_size=5), st.text(max_size=6),
                        st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=3), max_size=5),
                        st.lists(st.text(max_size=4), max_size=3), st.none(), st.integers(), st.floats(),
                        st.lists(st.one_of(st.integers(0, 96), st.text(max_size=2), st.booleans()), max_size=3)),
    "max_tokens": st.one_of(st.integers(-1, 4), st.sampled_from([CONTEXT, CONTEXT + 1, 2**70]), st.floats(),
                            st.booleans(), st.text(max_size=2), st.none()),
    "temperature": st.one_of(st.just(0), st.floats(-1, 3), st.floats(), st.booleans(), st.text(max_size=2)),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.just(1), st.booleans(), st.none()),
    "seed": st.one_of(st.integers(-2, 2**65), st.floats(), st.booleans(), st.none()),
    "stream": st.booleans(), "model": st.sampled_from(["tiny", "other"]), "user": st.text(max_size=3),
    "n": st.integers(0, 3),
}
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                       max_leaves=8)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


VALID = {  # values the contract accepts, to draw requests that must succeed as often as ones that must fail
    "prompt": st.one_of(st.lists(st.integers(0, 96), min_size=1, max_size=6), st.text(min_size=1, max_size=6),
                        st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=3), min_size=1, max_size=3),
                        st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3)),
    "max_tokens": st.one_of(st.integers(1, 4), st.none()), "temperature": st.sampled_from([0, 0.0, 0.7, 1, 2.5]),
    "top_p": st.sampled_from([1, 0.9, 0.5, 1e-9]), "seed": st.one_of(st.integers(0, 2**64 - 1), st.none()),
    "stream": st.just(False), "model": st.just("tiny"), "user": st.text(max_size=3),
}
HARMLESS = st.lists(st.tuples(st.sampled_from(["X-Fuzz", "Content-Type", "Accept", "Connection"]), HEADER_TEXT),
                    max_size=2)


@st.composite
def http_requests(draw):
    if draw(st.booleans()):  # a well-formed POST whose fields are mostly valid
        fields = {k: st.one_of(v, v, v, FIELDS[k]) for k, v in VALID.items()}
        obj = draw(st.fixed_dictionaries({"prompt": fields.pop("prompt")}, optional=fields))
        return "fields", obj, json.dumps(obj).encode(), "POST", "/v1/completions", "good", "exact", draw(HARMLESS)
    kind = draw(st.sampled_from(["fields", "json", "bytes"]))
    if kind == "fields":
        obj = draw(st.fixed_dictionaries({}, optional=FIELDS))
        body = json.dumps(obj).encode()
    elif kind == "json":
        obj = draw(JSONISH)
        body = json.dumps(obj).encode()
    else:
        obj, body = None, draw(st.binary(max_size=40))
    method = draw(st.sampled_from(["POST"] * 3 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "BREW"]))
    path = draw(st.sampled_from(["/v1/completions"] * 3 + ["/v1/models", "/health", "/", "/v1/completions?x=1",
                                                            "//v1/completions", "/%ff"]))
    host = draw(st.sampled_from(["good"] * 3 + ["localhost", "evil.example", "missing", "wrong-port"]))
    length = draw(st.sampled_from(["exact"] * 3 + ["missing", "short", "long", "negative", "text", "huge", "twice"]))
    extra = draw(st.lists(st.tuples(st.sampled_from(["X-Fuzz", "Content-Type", "Accept", "Origin", "Expect",
                                                     "Transfer-Encoding", "Connection"]), HEADER_TEXT), max_size=3))
    return kind, obj, body, method, path, host, length, extra


def build(srv: Served, method, path, host, length, extra, body) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"]
    hosts = {"good": srv.host, "localhost": f"localhost:{srv.port}", "evil.example": "evil.example",
             "wrong-port": f"127.0.0.1:{srv.port + 1}"}
    if host != "missing":
        lines.append(f"Host: {hosts[host]}")
    n = len(body)
    lengths = {"exact": [n], "missing": [], "short": [max(n - 3, 0)], "long": [n + 7], "negative": [-n - 1],
               "text": ["ten"], "huge": [10**15], "twice": [n, n + 1]}
    lines += [f"Content-Length: {v}" for v in lengths[length]]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parsed(body: bytes):
    """The JSON value of a body, or a marker that it has none (what the server sees)."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return INVALID


INVALID = object()
COMPLETIONS = ("/v1/completions", "/v1/completions?x=1", "//v1/completions")  # http.server folds a leading //


def expected_status(method, path, host, length, extra, body) -> str:
    """'ok' (a completion or a GET answer) or '4xx', from the contract alone."""
    names = {k.lower() for k, _ in extra}
    if host not in ("good", "localhost") or names & {"origin", "expect", "transfer-encoding"}:
        return "4xx"
    if method == "POST" and path in COMPLETIONS:
        return "ok" if length == "exact" and expected_ok(parsed(body)) else "4xx"
    if method == "GET" and path in ("/v1/models", "/health"):
        return "ok" if length in ("exact", "missing", "short", "long") else "4xx"  # a GET's body is not read
    return "4xx"


@pytest.mark.timeout(300)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(req=http_requests())
def test_fuzz_endpoint_answers_correctly_or_with_a_clear_4xx(srv, req):
    _, _, body, method, path, host, length, extra = req
    t0 = time.monotonic()
    code, reply = srv.raw(build(srv, method, path, host, length, extra, body), half_close=length == "long",
                          timeout=LIMITS.request_timeout_s + 30)
    assert code is not None, "closed without a reply"
    assert time.monotonic() - t0 < LIMITS.request_timeout_s + 20  # a bound for hangs, loose for a loaded CI machine
    want = expected_status(method, path, host, length, extra, body)
    event(f"{want}: {code}")
    if want == "4xx":
        assert 400 <= code < 500, (code, reply)
        if method != "HEAD":
            error_message(reply)
    elif method == "GET":
        assert code == 200, reply
    else:
        assert code == 200, reply
        obj = parsed(body)
        choices = json.loads(reply)["choices"]
        prompts = [obj["prompt"]] if isinstance(obj["prompt"], str) or type(obj["prompt"][0]) is int \
            else obj["prompt"]
        assert len(choices) == len(prompts)
        n = obj.get("max_tokens") or 16
        for p, c in zip(prompts, choices):
            assert 1 <= len(c["token_ids"]) <= n and all(0 <= t < 97 for t in c["token_ids"])
            if obj.get("temperature", 1.0) == 0:
                assert c["token_ids"] == alone(p, n)
    assert srv.request("GET", "/health", timeout=5)[0] == 200


@pytest.mark.timeout(60)
def test_the_server_still_serves_after_the_fuzz(srv):
    code, reply = srv.post({"prompt": [7, 8, 9], "max_tokens": 5, "temperature": 0}, timeout=20)
    assert code == 200 and reply["choices"][0]["token_ids"] == alone([7, 8, 9], 5)


# ---- the engine and sampling behind the endpoint ---------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(seed=2**64), dict(seed=-1), dict(seed=1.5), dict(seed=True), dict(seed="3"),
                                dict(max_new_tokens=True), dict(max_new_tokens=2.0), dict(temperature=True),
                                dict(temperature="1"), dict(temperature=float("nan")), dict(top_p=float("nan")),
                                dict(top_p=True), dict(stop_token_ids=(1, "2")), dict(stop_token_ids=(-1,))])
def test_sampling_params_refuse_what_a_generator_cannot_take(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_an_engine_seed_of_any_size_still_seeds_every_request():
    for seed in (2**70, -5):
        out = new_engine(seed=seed).generate([[1, 2]], SamplingParams(max_new_tokens=3, temperature=1.0))[0]
        assert out.error is None and len(out.tokens) == 3


def test_a_vanishing_top_p_keeps_the_most_probable_token():
    outs = new_engine().generate([[3, 4, 5], [6, 7]], [SamplingParams(4, temperature=1.0, top_p=p, seed=3)
                                                       for p in (4.7e-49, 5e-324)])
    assert [o.error for o in outs] == [None, None]
    assert outs[0].tokens == alone([3, 4, 5], 4) and outs[1].tokens == alone([6, 7], 4)


def test_a_vanishing_temperature_is_greedy_and_does_not_break_the_batch():
    params = [SamplingParams(max_new_tokens=4, temperature=t, seed=1, stop_token_ids=()) for t in (1e-300, 5e-324)]
    outs = new_engine().generate([[3, 4, 5], [6, 7]], params)
    assert [o.error for o in outs] == [None, None]
    assert outs[0].tokens == alone([3, 4, 5], 4) and outs[1].tokens == alone([6, 7], 4)
    huge = new_engine().generate([[3]], SamplingParams(max_new_tokens=4, temperature=1e308, seed=2))[0]
    assert huge.error is None and len(huge.tokens) == 4


def test_sampling_a_batch_with_a_nan_row_samples_the_others():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    logits[1, 4] = float("nan")
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(3)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = sample(logits, params, gens)
    assert len(tokens) == 3 and all(0 <= t < 11 for t in tokens)


@pytest.mark.parametrize("prompt", [np.array([5, 6, 7], dtype=">i4"), np.array([5, 6, 7], dtype="<u2"),
                                    np.array([5, 6, 7], dtype=">i8"), torch.tensor([5, 6, 7]), (5, 6, 7),
                                    [np.int64(5), np.uint8(6), 7]])
def test_token_id_prompts_in_any_integer_container_and_byte_order(prompt):
    out = new_engine().generate([prompt], SamplingParams(max_new_tokens=3))[0]
    assert out.error is None and out.tokens == alone([5, 6, 7], 3)


@pytest.mark.parametrize("prompt,message", [
    (np.array([5.0, 6.0]), "integer token ids"), (torch.tensor([5.0, 6.0]), "integer token ids"),
    (np.array([[5, 6]]), "one-dimensional"), (torch.tensor([[5, 6]]), "one-dimensional"),
    (np.array([True, False]), "integer token ids"), (np.array([2**40], dtype=">i8"), "outside the vocabulary"),
    (b"\x05\x06", "integer token ids"), (7, "text or a sequence")])
def test_token_id_prompts_of_the_wrong_kind_are_refused(prompt, message):
    out = new_engine().generate([prompt], SamplingParams(max_new_tokens=2))[0]
    assert out.finish_reason == "error" and message in out.error


# ---- the serve CLI ---------------------------------------------------------------------------------------------

def _cli(args: list[str]) -> tuple[int, str]:
    from impl.serve.__main__ import main

    err = io.StringIO()
    rc = main([*args, "--device", "cpu"], stdin=io.StringIO("hello\n"), stdout=io.StringIO(), stderr=err)
    return rc, err.getvalue()


def test_serve_cli_prints_one_line_for_load_errors(tmp_path):
    from impl.fp8.tiny import tiny_config, write_dense_checkpoint

    good = tmp_path / "good"
    write_dense_checkpoint(good, tiny_config(), dtype=torch.float32)
    cases = {"missing": (tmp_path / "nowhere", "config.json"),
             "list": (tmp_path / "list", "JSON object"), "abc": (tmp_path / "abc", "hidden_size"),
             "layers": (tmp_path / "layers", "num_hidden_layers"), "corrupt": (tmp_path / "corrupt", "safetensors"),
             "no tokenizer": (good, "tokenizer")}
    for name in ("list", "abc", "layers", "corrupt"):
        d = cases[name][0]
        d.mkdir()
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "abc" / "config.json").write_text(json.dumps(tiny_config(hidden_size="abc")))
    (tmp_path / "layers" / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=10**9)))
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    for name, (d, word) in cases.items():
        t0 = time.monotonic()
        rc, err = _cli([str(d), "--prompts", "-"])
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, err)
        assert "Traceback" not in err and word in lines[0], (name, lines)
        assert time.monotonic() - t0 < 30, name
    rc, err = _cli([str(good), "--prompts", str(tmp_path / "no-such-prompts.txt")])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no-such-prompts.txt" in err
