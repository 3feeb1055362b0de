"""The load test's client, in the standard library only: it runs in its own process (``drive_in_process``), so its
request threads do not compete for the serving process's interpreter lock.

``drive`` sends every prompt as ``{"prompt": ids, "max_tokens": N, "temperature": 0}`` to ``/v1/completions`` with at
most ``concurrency`` requests in flight, each with a timeout, and records status, token ids, client latency and the
send time (seconds after the load began);
prompts not yet sent at the deadline are skipped.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any


def make_opener() -> urllib.request.OpenerDirector:
    """One opener for every request of a load: plain HTTP, no proxy (the endpoint is on this host). Built once,
    before the clock starts: ``urllib.request.urlopen`` builds the global opener on first use, and a fresh process
    whose threads all call it at once builds one per thread (each loading the system's TLS certificates), which
    cost a 64-thread client 1.25 s on the H200 machine before its first request left."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url: str, body: dict[str, Any], timeout: float, opener: urllib.request.OpenerDirector) -> dict[str, Any]:
    """One request; returns status, token ids (of choice 0), client latency and any error."""
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with opener.open(req, timeout=timeout) as r:
            reply = json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as e:
        return {"status": e.code, "latency_s": time.perf_counter() - t0, "error": e.read()[:300].decode("replace")}
    except Exception as e:  # timeouts, refused connections: recorded, the load goes on
        return {"status": None, "latency_s": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    choice = reply["choices"][0]
    return {"status": status, "latency_s": time.perf_counter() - t0, "tokens": choice["token_ids"],
            "finish_reason": choice["finish_reason"]}


def drive(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int, timeout_s: float,
          budget_s: float) -> tuple[list[dict[str, Any] | None], float]:
    """Send every prompt with at most ``concurrency`` in flight; (results in prompt order, wall seconds). Prompts not
    yet sent ``budget_s`` after the start are skipped (None)."""
    deadline = time.perf_counter() + budget_s
    out: list[dict[str, Any] | None] = [None] * len(prompts)
    opener = make_opener()

    def one(i: int) -> None:
        sent = time.perf_counter()
        if sent < deadline:
            out[i] = post(url, {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0}, timeout_s, opener)
            out[i]["sent_s"] = sent - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(prompts))))
    return out, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(math.floor(pos))
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def drive_in_process(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int, timeout_s: float,
                     budget_s: float) -> tuple[list[dict[str, Any] | None], float]:
    """``drive`` in a fresh (spawned) process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(drive, url, prompts, concurrency, max_tokens, timeout_s, budget_s).result()
