"""An OpenAI-style ``POST /v1/completions`` endpoint on localhost over one ``Engine``.

Requests from any number of HTTP clients join the same continuous batch: handler threads hand prompts to a single
engine thread (the engine is not thread-safe) and wait for their completions. Body fields: ``prompt`` (a string, a
list of strings, a list of token ids, or a list of such lists), ``max_tokens`` (16), ``temperature`` (1.0, as
OpenAI; 0 = greedy), ``top_p`` (1.0), ``seed``. The reply has OpenAI's shape (``choices[i].text``,
``finish_reason``, ``usage``) plus ``choices[i].token_ids``. A request with a bad prompt gets HTTP 400 naming it;
other clients are unaffected. ``GET /v1/models`` lists the one model.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from impl.serve.engine import Completion, Engine
from impl.serve.sampling import SamplingParams


class EngineLoop:
    """Runs ``engine.step()`` in one thread while work exists; ``submit`` is safe from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: list[tuple[Any, SamplingParams, Future]] = []
        self._waiting: dict[int, Future] = {}
        self._wake = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: Any, params: SamplingParams) -> Future:
        fut: Future = Future()
        with self._wake:
            self._inbox.append((prompt, params, fut))
            self._wake.notify()
        return fut

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._stop or self.engine.has_unfinished()):
                    self._wake.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            for prompt, params, fut in inbox:
                self._waiting[self.engine.add_request(prompt, params)] = fut
            try:
                if self.engine.has_unfinished():
                    self.engine.step()
            except Exception as e:  # a failing forward fails the requests in flight, not the server
                for rid in list(self._waiting):
                    self.engine.abort(rid, f"engine error: {e}")
            for rid in [r for r in self._waiting if r in self.engine.done]:
                self._waiting.pop(rid).set_result(self.engine.done.pop(rid))


def parse_request(body: dict[str, Any]) -> tuple[list[Any], SamplingParams]:
    """Prompts and sampling settings of a /v1/completions body (ValueError names a bad field)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise ValueError("'prompt' must be a string, a list of token ids, or a non-empty list of those")
    try:
        params = SamplingParams(max_new_tokens=int(body.get("max_tokens", 16)),
                                temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                seed=None if body.get("seed") is None else int(body["seed"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad sampling field: {e}") from e
    return prompts, params


def completion_body(outs: list[Completion], model_name: str, rid: int) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text or "", "token_ids": o.tokens, "finish_reason": o.finish_reason,
                "logprobs": None} for i, o in enumerate(outs)]
    used = sum(len(o.tokens) for o in outs)
    prompt = sum(len(o.prompt_tokens) for o in outs)
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": used,
                                          "total_tokens": prompt + used}}


def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``); ``server.loop.close()`` stops the engine thread."""
    loop = EngineLoop(engine)
    counter = iter(range(1 << 62))

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/completions":
                return self._reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompts, params = parse_request(body)
            except ValueError as e:
                return self._reply(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            outs = [f.result() for f in [loop.submit(p, params) for p in prompts]]
            bad = [o for o in outs if o.error]
            if bad:
                return self._reply(400, {"error": {"message": bad[0].error, "type": "invalid_request_error"}})
            self._reply(200, completion_body(outs, model_name, next(counter)))

        def log_message(self, fmt: str, *args: Any) -> None:
            pass  # quiet: the CLI prints its own progress

    server = ThreadingHTTPServer((host, port), Handler)
    server.loop = loop  # type: ignore[attr-defined]
    return server
