"""An OpenAI-style ``POST /v1/completions`` endpoint on localhost over one ``Engine``.

Requests from any number of HTTP clients join the same continuous batch: handler threads validate and tokenize the
prompts, hand them to a single engine thread (the engine is not thread-safe) and wait for their completions.

Body: one JSON object of at most ``ServerLimits.max_body_bytes``, with ``prompt`` (text, a list of token ids, or a list
of up to ``max_prompts`` of either), ``max_tokens`` (an integer in [1, the context], 16), ``temperature`` (a finite
number >= 0, 1.0 as OpenAI; 0 = greedy), ``top_p`` (in (0, 1], 1.0), ``seed`` (an integer in [0, 2**64)), ``model``
(this model's name), ``stream`` (false only) and ``user`` (ignored); null means absent; any other field is refused,
and so is any value of another type ("3", 1.9 and true are not integers). Every prompt of a request is tokenized and
checked before any of them is generated. The reply has OpenAI's shape (``choices[i].text``, ``finish_reason``,
``usage``) plus ``choices[i].token_ids``. Errors are ``{"error": {"message", "type"}}`` with status

  400      a malformed request line, header, body or field (the message names it)
  403      a Host or Origin header that does not name this server (DNS rebinding, requests from other sites)
  404/405  an unknown route or model / a method the route does not take (with ``Allow``)
  408      a request that did not arrive within ``request_timeout_s``
  411/413  a POST without Content-Length / a Content-Length over the cap
  417      an Expect other than 100-continue
  500      an engine error during this request's generation
  503      the engine thread has stopped (``GET /health`` and ``GET /v1/models`` say so too)

The socket is not trusted: each read times out, the whole request must arrive within ``request_timeout_s``, the
Content-Length must be one non-negative integer within the cap and the body as long as it says. A client that
disconnects while it waits has its generation cancelled. One request's failure is that request's alone; if the engine
thread itself dies, every waiting request is answered with 503 and the health endpoints report it.
"""
from __future__ import annotations

import json
import math
import re
import select
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future, wait
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from impl.serve.engine import Completion, Engine
from impl.serve.sampling import SEED_LIMIT, SamplingParams


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost the server before it is refused."""

    request_timeout_s: float = 30.0  # to send the request line, headers and body (and each socket read or write)
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64
    poll_s: float = 0.5  # how often a waiting handler checks whether its client is still there (it wakes at once
    # when its result is ready; each poll takes the interpreter lock from the engine thread, so not too often)
    backlog: int = 1024  # connections the kernel queues before accept (a burst of clients beyond it is reset)

    def __post_init__(self) -> None:
        if not (self.request_timeout_s > 0 and self.poll_s > 0 and self.max_body_bytes >= 1 and self.max_prompts >= 1
                and self.backlog >= 1):
            raise ValueError(f"every limit must be positive: {self}")


class EngineStopped(RuntimeError):
    """The engine thread is not running (it died, or the server is shutting down)."""


class RequestError(Exception):
    """A request refused with an HTTP status and a message naming the problem."""

    TYPES = {400: "invalid_request_error", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
             408: "timeout", 411: "length_required", 413: "request_too_large", 414: "uri_too_long",
             417: "expectation_failed", 431: "headers_too_large", 500: "server_error", 501: "not_implemented",
             503: "engine_unavailable", 505: "http_version_not_supported"}

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or self.TYPES.get(status, "error")


class EngineLoop:
    """Runs ``engine.step()`` in one thread while work exists; ``submit`` and ``cancel`` are safe from any thread.

    A step that raises fails the requests in flight (not the thread). Anything that does end the thread sets
    ``error`` and fails every waiting request with ``EngineStopped``. ``seconds`` splits the thread's time into
    ``idle`` (waiting for work), ``step`` (inside ``engine.step``) and ``other`` (queueing, answering futures)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: str | None = None
        self._inbox: list[tuple[list[int], SamplingParams, Future]] = []
        self._cancel: list[Future] = []
        self._waiting: dict[int, Future] = {}
        self._wake = threading.Condition()
        self._stop = False
        self.seconds = {"idle": 0.0, "step": 0.0, "other": 0.0}
        self.thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self.thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> list[Future]:
        """Queue token-id prompts together (they join the batch in the same step); one future per prompt."""
        futs = [Future() for _ in prompts]
        with self._wake:
            if self.error is not None:
                for f in futs:
                    f.set_exception(EngineStopped(self.error))
                return futs
            self._inbox.extend((p, params, f) for p, f in zip(prompts, futs))
            self._wake.notify()
        return futs

    def cancel(self, futs: list[Future]) -> None:
        """Abort the requests of these futures (their clients left); their pages return to the cache."""
        with self._wake:
            self._cancel.extend(futs)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._serve()
            why = "the server is shutting down"
        except BaseException as e:  # noqa: BLE001  (the thread is ending: say why, and answer everyone waiting)
            why = f"the engine thread stopped: {type(e).__name__}: {e}"
            print(f"[serve] {why}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
        with self._wake:
            self.error = why
            pending = [f for _, _, f in self._inbox] + list(self._waiting.values())
            self._inbox, self._waiting = [], {}
        for f in pending:
            if not f.done():
                f.set_exception(EngineStopped(why))

    def _serve(self) -> None:
        clock = time.perf_counter
        while True:
            t_start = clock()
            with self._wake:
                t_wait = clock()
                while not (self._inbox or self._cancel or self._stop or self.engine.has_unfinished()):
                    self._wake.wait()
                idle = clock() - t_wait
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                cancel, self._cancel = self._cancel, []
            for ids, params, fut in inbox:
                try:
                    self._waiting[self.engine.add_request(ids, params)] = fut
                except Exception as e:  # noqa: BLE001  (a request the engine refuses fails alone)
                    fut.set_exception(e)
            for fut in cancel:
                for rid in [r for r, f in self._waiting.items() if f is fut]:
                    self.engine.abort(rid, "cancelled: the client disconnected")
            t_step = clock()
            try:
                if self.engine.has_unfinished():
                    self.engine.step()
            except Exception as e:  # noqa: BLE001  (a failing forward fails the requests in flight, not the server)
                for rid in list(self._waiting):
                    self.engine.abort(rid, f"engine error: {type(e).__name__}: {e}")
            step = clock() - t_step
            for rid in [r for r in self._waiting if r in self.engine.done]:
                self._waiting.pop(rid).set_result(self.engine.done.pop(rid))
            self.seconds["idle"] += idle
            self.seconds["step"] += step
            self.seconds["other"] += clock() - t_start - idle - step


# ---- the body ----------------------------------------------------------------------------------------------------

FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "seed", "model", "stream", "user")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", type(None): "null",
            float: "a float"}.get(type(v), f"a {type(v).__name__}")


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if type(v) is not int or not lo <= v <= hi:
        raise RequestError(400, f"{key}: expected an integer in [{lo}, {hi}], got {_kind(v)} {json.dumps(v):.40}")
    return v


def _number(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    try:
        x = float(v) if type(v) in (int, float) else math.nan
    except OverflowError:
        x = math.nan
    if not math.isfinite(x):
        raise RequestError(400, f"{key}: expected a finite number, got {_kind(v)} {json.dumps(v):.40}")
    return x


def _prompt_list(p: Any, max_prompts: int) -> list[Any]:
    """The prompts of a ``prompt`` field: [text], [ids], or a list of either (checked for shape, not content)."""
    ids = lambda x: isinstance(x, list) and x and all(type(t) is int for t in x)  # noqa: E731
    if isinstance(p, str) or ids(p):
        return [p]
    if isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(ids(x) for x in p)):
        if len(p) > max_prompts:
            raise RequestError(400, f"prompt: {len(p)} prompts in one request; at most {max_prompts}")
        return p
    raise RequestError(400, "prompt: expected text, a list of integer token ids, or a non-empty list of texts or of "
                            f"token-id lists (at most {max_prompts}), got {_kind(p)} {json.dumps(p):.60}")


def parse_body(data: bytes) -> dict[str, Any]:
    """The JSON object of a request body (RequestError 400 naming what is wrong)."""
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON ({str(e) or type(e).__name__})") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(body)}")
    return body


def parse_request(body: dict[str, Any], engine: Engine, model_name: str,
                  max_prompts: int = 64) -> tuple[list[list[int]], SamplingParams]:
    """Token ids of every prompt and the sampling settings of a /v1/completions body; every prompt is tokenized and
    checked against the engine (context, vocabulary, cache) here, before any is generated."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unsupported field {unknown[0]!r} (this server reads {', '.join(FIELDS)})")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {json.dumps(model):.60} is not served here; this server serves "
                                f"{model_name!r}", "model_not_found")
    if body.get("stream") not in (None, False):
        raise RequestError(400, "stream: streaming is not supported; leave it out or send false")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError(400, f"user: expected text, got {_kind(body['user'])}")
    max_tokens = _int(body, "max_tokens", 16, 1, engine.max_seq_len)
    seed = _int(body, "seed", None, 0, SEED_LIMIT - 1)
    temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
    if temperature < 0:
        raise RequestError(400, f"temperature: expected a number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(400, f"top_p: expected a number in (0, 1], got {top_p}")
    if "prompt" not in body:
        raise RequestError(400, "prompt: missing")
    prompts = _prompt_list(body["prompt"], max_prompts)
    ids = []
    for i, p in enumerate(prompts):
        try:
            ids.append(engine.prepare(p))
        except (TypeError, ValueError) as e:
            raise RequestError(400, f"prompt{f' {i}' if len(prompts) > 1 else ''}: {e}") from None
    return ids, SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def completion_body(outs: list[Completion], model_name: str, rid: int) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text or "", "token_ids": o.tokens, "finish_reason": o.finish_reason,
                "logprobs": None} for i, o in enumerate(outs)]
    used = sum(len(o.tokens) for o in outs)
    prompt = sum(len(o.prompt_tokens) for o in outs)
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": used,
                                          "total_tokens": prompt + used}}


# ---- the headers -------------------------------------------------------------------------------------------------

ROUTES = {"/v1/completions": ("POST",), "/v1/models": ("GET",), "/health": ("GET",)}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """Host header values that name a server bound to (host, port); None (any) for a wildcard bind."""
    if host in ("", "0.0.0.0", "::"):
        return None
    names = set(LOOPBACK) if host in LOOPBACK else {host.lower()}
    names = {f"[{n}]" if ":" in n else n for n in names}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


def content_length(values: list[str], limit: int) -> int | None:
    """The one Content-Length of a request (None if absent); RequestError 400/413 otherwise."""
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(400, f"Content-Length given {len(values)} times")
    text = values[0].strip()
    if not re.fullmatch(r"[0-9]{1,20}", text):
        raise RequestError(400, f"Content-Length must be a non-negative integer, got {text[:40]!r}")
    n = int(text)
    if n > limit:
        raise RequestError(413, f"Content-Length {n} is more than this server takes ({limit} bytes)")
    return n


# ---- the server --------------------------------------------------------------------------------------------------

def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                limits: ServerLimits = ServerLimits()) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``); ``server.loop.close()`` stops the engine thread. The
    engine's decode graphs are all captured first, so no request waits for a capture."""
    captured = engine.capture_graphs()
    if captured:
        print(f"[serve] captured {captured} decode CUDA graphs (batch buckets up to {engine.cfg.max_batch})",
              file=sys.stderr)
    loop = EngineLoop(engine)
    counter = iter(range(1 << 62))
    hosts: set[str] | None = None  # filled in once the port is bound (port 0 picks one)

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.request_timeout_s  # every socket read and write
        server_version = "impl.serve"
        sys_version = ""

        # -- reading ---------------------------------------------------------------------------------------

        def handle_one_request(self) -> None:
            self.command, self.request_version, self.requestline = "", "HTTP/1.0", ""
            self.close_connection = True
            self._late = threading.Event()
            timer = threading.Timer(limits.request_timeout_s, self._stop_reading)
            timer.daemon = True
            timer.start()
            try:
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline:
                    return
                if len(self.raw_requestline) > 65536:
                    raise RequestError(414, "the request line is longer than 65536 bytes")
                if not self.parse_request():  # an error reply was sent (through send_error)
                    return
                self.close_connection = True
                if self.request_version == "HTTP/0.9":
                    self.request_version = "HTTP/1.0"
                    raise RequestError(400, "HTTP/0.9 requests are not supported")
                method, path, data = self._read()
                timer.cancel()
                if self._late.is_set():  # the deadline struck as the last byte came: the read side is shut
                    raise TimeoutError
                self._respond(method, path, data)
            except RequestError as e:
                self._error(e)
            except TimeoutError:
                self._error(RequestError(408, f"the request did not arrive within {limits.request_timeout_s} s"))
            except (ConnectionError, OSError):
                pass  # the client left; nobody to answer
            finally:
                timer.cancel()

        def _stop_reading(self) -> None:
            """The whole-request deadline: wake a read that a trickling client keeps alive (replies can still go)."""
            self._late.set()
            try:
                self.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass

        def _read(self) -> tuple[str, str, bytes]:
            """(method, route, body) of a request that passed every header check; RequestError otherwise."""
            if self._late.is_set():
                raise TimeoutError
            given = self.headers.get_all("Host") or []
            if len(given) != 1:
                raise RequestError(400, "a Host header is required (exactly one)" if not given
                                   else "Host header given more than once")
            if hosts is not None and given[0].strip().lower() not in hosts:
                raise RequestError(403, f"Host {given[0][:60]!r} does not name this server ({sorted(hosts)[0]}): "
                                        "refused (DNS rebinding)")
            origin = self.headers.get("Origin")
            if origin is not None and hosts is not None and origin.strip().lower() not in {f"http://{h}" for h in
                                                                                           hosts}:
                raise RequestError(403, f"Origin {origin[:60]!r} is another site: cross-site requests are refused")
            route = self.path.split("?", 1)[0]
            if route not in ROUTES:
                raise RequestError(404, f"no route {self.path[:100]!r} (routes: {', '.join(ROUTES)})")
            if self.command not in ROUTES[route]:
                raise RequestError(405, f"{self.command} is not allowed on {route} (allowed: "
                                        f"{', '.join(ROUTES[route])})")
            expect = self.headers.get("Expect")
            if expect is not None and expect.strip().lower() != "100-continue":
                raise RequestError(417, f"Expect {expect[:40]!r} is not supported")
            if self.headers.get("Transfer-Encoding") is not None:
                raise RequestError(411 if self.command == "POST" else 400,
                                   "Transfer-Encoding (a chunked body) is not supported: send a Content-Length")
            n = content_length(self.headers.get_all("Content-Length") or [], limits.max_body_bytes)
            if self.command != "POST":
                return self.command, route, b""  # a GET's body is not read (the connection closes after the reply)
            if n is None:
                raise RequestError(411, "Content-Length is required for a POST body")
            data = self._read_body(n)
            return self.command, route, data

        def _read_body(self, n: int) -> bytes:
            chunks, got = [], 0
            while got < n:
                chunk = self.rfile.read1(min(n - got, 65536))
                if not chunk:
                    if self._late.is_set():
                        raise TimeoutError
                    raise RequestError(400, f"the body is shorter than its Content-Length ({got} of {n} bytes "
                                            "arrived before the client stopped sending)")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        # -- answering -------------------------------------------------------------------------------------

        def _respond(self, method: str, route: str, data: bytes) -> None:
            if route == "/health" or route == "/v1/models":
                if loop.error is not None:
                    raise RequestError(503, f"the engine is not running ({loop.error})")
                if route == "/health":
                    return self._reply(200, {"status": "ok", "model": model_name})
                return self._reply(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            if loop.error is not None:
                raise RequestError(503, f"the engine is not running ({loop.error})")
            prompts, params = parse_request(parse_body(data), engine, model_name, limits.max_prompts)
            futs = loop.submit(prompts, params)
            while True:
                _, pending = wait(futs, timeout=limits.poll_s)
                if not pending:
                    break
                if self._client_gone():
                    loop.cancel(futs)
                    return
            outs = []
            for f in futs:
                e = f.exception()
                if isinstance(e, EngineStopped):
                    raise RequestError(503, str(e))
                if e is not None:
                    raise RequestError(500, f"{type(e).__name__}: {e}")
                outs.append(f.result())
            bad = [o for o in outs if o.error]
            if bad:
                raise RequestError(500, bad[0].error)
            self._reply(200, completion_body(outs, model_name, next(counter)))

        def _client_gone(self) -> bool:
            """True once the client has closed its end (a readable socket with nothing to read)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _reply(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, e: RequestError) -> None:
            if self._late.is_set() and e.status == 400:  # the deadline cut the request short: that is the problem
                e = RequestError(408, f"the request did not arrive within {limits.request_timeout_s} s")
            self.request_version = "HTTP/1.0"  # never answer in HTTP/0.9 (no status line)
            route = (getattr(self, "path", "") or "").split("?", 1)[0]
            allow = {"Allow": ", ".join(ROUTES[route])} if e.status == 405 and route in ROUTES else {}
            try:
                self._reply(e.status, {"error": {"message": e.message, "type": e.kind}}, allow)
            except OSError:
                pass  # the client left

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The base class's errors (malformed request line or headers) as JSON too."""
            phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
            self._error(RequestError(code, f"{message or phrase}{f' ({explain})' if explain else ''}"))

        def log_message(self, fmt: str, *args: Any) -> None:
            pass  # quiet: the CLI prints its own progress

    server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": limits.backlog})
    server = server_class((host, port), Handler)
    hosts = allowed_hosts(host, server.server_address[1])
    server.loop = loop  # type: ignore[attr-defined]
    return server
