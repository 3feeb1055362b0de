"""Compare L2 policies on one model, pick the best, and serve with it.

``compare_policies`` serves the model under the default and each candidate policy in ``rounds`` rounds (the order
reversed every other round, so drift does not favour one side), ``reps`` timed requests each; every runner starts
from a full reset (carve-out 0, no window, persisting lines reset, L2 flushed). A candidate drops out — with the
reason in ``excluded`` — when it cannot apply to the model, when its plan has the same effect as a policy before it
(same carve-out, window and prefetch: one candidate, measured once), when its outputs are not bit-identical to the
default's in any round (a policy that changes outputs is never chosen), or when serving under it raised. Gains carry the bootstrap interval of
``stats.gain_interval``.

``pick_best`` is the one rule, offline (experiments) and online (``choose_policy``): among the candidates whose
gain interval lies above zero, the simplest whose interval reaches the highest lower end; none: ``default``.

``serve_best`` is what a server calls: measure the candidates for a few requests, then serve every request with the
chosen policy; on exit, whatever happened, the device is as it was found.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from impl.l2cache.control import L2Controller
from impl.l2cache.policies import get_policy
from impl.l2cache.serving import PolicyRunner, measure, output_digest, outputs_by_kind
from impl.l2cache.stats import GainInterval, gain_interval

CANDIDATES = ("persist_weights", "stream_activations", "prefetch_kernel", "prefetch_ahead", "prefetch_stream",
              "persist_prefetch")


@dataclass
class Comparison:
    """What ``compare_policies`` measured on one workload (all times in ms)."""

    workload: str
    rounds_ms: dict[str, list[list[float]]] = field(default_factory=dict)  # policy -> round -> request times
    info: dict[str, dict] = field(default_factory=dict)  # policy -> runner info of its first round
    digests: dict[str, list[list[str]]] = field(default_factory=dict)  # policy -> round -> one digest per kind
    excluded: dict[str, str] = field(default_factory=dict)  # policy -> why it is not a candidate
    gains: dict[str, GainInterval] = field(default_factory=dict)
    complete: bool = True

    @property
    def measured(self) -> list[str]:
        return [p for p in self.rounds_ms if p != "default" and p not in self.excluded]

    def bit_identical(self, policy: str) -> bool:
        ref = self.digests["default"][0]
        return all(d == ref for d in self.digests.get(policy, [])) and policy in self.digests

    def as_dict(self) -> dict[str, Any]:
        rows = {}
        for p, rounds in self.rounds_ms.items():
            g = self.gains.get(p)
            flat = sorted(t for r in rounds for t in r)
            rows[p] = {**self.info.get(p, {}), "rounds_ms": rounds, "digests": self.digests.get(p, []),
                       "median_ms": flat[len(flat) // 2] if flat else None, "bit_identical": self.bit_identical(p),
                       "excluded": self.excluded.get(p), "gain": g.as_dict() if g else None}
        return {"workload": self.workload, "policies": rows, "complete": self.complete,
                "best": pick_best(self), "order": list(self.rounds_ms)}


def _serve_once(workload: Any, name: str, controller: L2Controller, reps: int, warmup: int,
                runner_kw: dict) -> tuple[list[float], list[str], dict]:
    with PolicyRunner(workload, get_policy(name), controller, **runner_kw) as runner:
        if not runner.info["applicable"]:
            return [], [], dict(runner.info)
        digests = [output_digest(o) for o in outputs_by_kind(runner)]
        return measure(runner, reps, warmup).times_ms, digests, dict(runner.info)


def compare_policies(workload: Any, controller: L2Controller, candidates: tuple[str, ...] = CANDIDATES, *,
                     rounds: int = 3, reps: int = 100, warmup: int = 10, deadline: float | None = None,
                     runner_kw: dict | None = None) -> Comparison:
    """Measure default and ``candidates`` on ``workload`` (see the module doc). ``deadline`` (``time.time()``):
    no new round starts after it (at least one round always runs); the result then says ``complete=False``."""
    if rounds < 1 or reps < 1:
        raise ValueError(f"rounds and reps must be >= 1, got {rounds}, {reps}")
    runner_kw = runner_kw or {}
    names = ["default"] + [c for c in candidates if c != "default"]
    cmp = Comparison(workload.name)
    effects: dict[tuple, str] = {}
    for r in range(rounds):
        if r > 0 and deadline is not None and time.time() > deadline:
            cmp.complete = False
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            if name in cmp.excluded:
                continue
            try:
                times, digests, info = _serve_once(workload, name, controller, reps, warmup, runner_kw)
            except Exception as e:  # a candidate that fails drops out (its runner restored the device); not the default
                if name == "default":
                    raise
                cmp.excluded[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                continue
            if r == 0 or name not in cmp.info:
                cmp.info[name] = info
            if not info["applicable"]:
                cmp.excluded[name] = f"not applicable: {info['note']}"
                continue
            effect = tuple(info[k] for k in ("carveout_bytes", "window_ptr", "window_bytes", "hit_ratio", "hit_prop",
                                             "miss_prop", "prefetch"))
            if effects.setdefault(effect, name) != name:
                cmp.excluded[name] = f"same settings as {effects[effect]}"
                continue
            cmp.rounds_ms.setdefault(name, []).append(times)
            cmp.digests.setdefault(name, []).append(digests)
    for name in list(cmp.rounds_ms):
        if name != "default" and name not in cmp.excluded and not cmp.bit_identical(name):
            cmp.excluded[name] = "outputs differ from the default's"
    base = cmp.rounds_ms["default"]
    for name in cmp.measured:
        k = min(len(base), len(cmp.rounds_ms[name]))
        cmp.gains[name] = gain_interval(base[:k], cmp.rounds_ms[name][:k])
    return cmp


def pick_best(cmp: Comparison | dict) -> str:
    """The one pick rule (offline and online). Candidates: measured, applicable, bit-identical, gain interval above
    0 (none: ``default``). Leader: the highest interval lower end. Chosen: the first candidate in ``CANDIDATES`` order
    (fewest mechanisms first) whose interval reaches the leader's lower end — a policy is not chosen over a simpler one
    it does not beat beyond noise. Takes a ``Comparison`` or its ``as_dict()`` (how the experiments store it)."""
    if isinstance(cmp, Comparison):
        ci = {p: (cmp.gains[p].lo_pct, cmp.gains[p].hi_pct) for p in cmp.measured
              if p in cmp.gains and cmp.bit_identical(p)}
    else:
        ci = {p: (r["gain"]["lo_pct"], r["gain"]["hi_pct"]) for p, r in cmp["policies"].items()
              if p != "default" and not r["excluded"] and r["gain"] and r["bit_identical"]}
    above = {p: v for p, v in ci.items() if v[0] > 0}
    if not above:
        return "default"
    lead = max(v[0] for v in above.values())
    rank = {p: i for i, p in enumerate(CANDIDATES)}
    return min((p for p, v in above.items() if v[1] >= lead), key=lambda p: (rank.get(p, len(rank)), p))


@dataclass
class Choice:
    policy: str
    comparison: Comparison


def choose_policy(workload: Any, controller: L2Controller, candidates: tuple[str, ...] = CANDIDATES, *,
                  rounds: int = 3, reps: int = 50, warmup: int = 5, runner_kw: dict | None = None) -> Choice:
    """Measure the candidates for a few requests (``rounds`` × ``reps`` each) and pick by ``pick_best``."""
    cmp = compare_policies(workload, controller, candidates, rounds=rounds, reps=reps, warmup=warmup,
                           runner_kw=runner_kw)
    return Choice(pick_best(cmp), cmp)


@contextlib.contextmanager
def serve_best(workload: Any, controller: L2Controller, candidates: tuple[str, ...] = CANDIDATES, *,
               rounds: int = 2, reps: int = 30, runner_kw: dict | None = None) -> Iterator[tuple[PolicyRunner, Choice]]:
    """Choose a policy (``choose_policy``), then yield a runner serving ``workload`` under it; on exit (always,
    Ctrl-C included) the L2 state the runner found is restored."""
    choice = choose_policy(workload, controller, candidates, rounds=rounds, reps=reps, runner_kw=runner_kw)
    with PolicyRunner(workload, get_policy(choice.policy), controller, **(runner_kw or {})) as runner:
        yield runner, choice
