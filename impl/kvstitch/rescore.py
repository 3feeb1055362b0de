"""Score the stored generations of a GPU run with rouge-score on this machine (the GPU image may lack it).

    python -m impl.kvstitch.experiments rescore --slug h200

The record keeps the GPU run's device, commit, date and run id (the generations are theirs) and gains ``rescored``:
the commit and date of the code that computed the scores and everything derived from them (``summary.summarise``).
The ledger vouches for both commits.
"""
from __future__ import annotations

import json
from pathlib import Path

from impl.kvstitch.evaluate import rouge, rouge_available
from impl.kvstitch.summary import summarise

SYSTEM = "kvstitch"


class RescoreRefused(RuntimeError):
    """Rescoring cannot run here: no rouge-score, or the code is not committed."""


def rescore(slug: str, root: Path | None = None) -> int:
    """Rescore every ``rouge_*.json`` of ``results/<slug>/kvstitch/`` (module doc); refuses uncommitted code."""
    from impl.common.results import RESULTS, atomic_write_text, git_commit, now_iso

    if not rouge_available():
        raise RescoreRefused("rouge-score is not importable here: `pip install rouge-score`")
    commit = git_commit()
    if commit == "unknown" or commit.endswith("+dirty"):
        raise RescoreRefused(f"rescore from committed code: this checkout is at {commit!r} (commit impl/ first)")
    for path in sorted(((root or RESULTS) / slug / SYSTEM).glob("rouge_*.json")):
        rec = json.loads(path.read_text())
        d = rec["data"]
        refs = d["references"]
        tuned = [d["prefill_lora"]["scores"]] if "prefill_lora" in d else []
        for scores in [d["prefill"]["scores"], *tuned, *[s for dd in d["decodes"] for s in dd["scores"].values()]]:
            for task, v in scores.items():
                v["rouge"] = rouge(v["generations"], refs[task])
        d["rouge_scored"] = "rescored on the CPU side from the GPU run's generations"
        rec["data"] = summarise(d)
        rec["rescored"] = {"commit": commit, "date": now_iso(), "of_commit": rec.get("commit")}
        atomic_write_text(path, json.dumps(rec, indent=2, sort_keys=True) + "\n", overwrite=True)
        print(f"rescored {path}: interpolation {rec['data']['interpolation']} (run at {rec.get('commit')}, scored at "
              f"{commit})")
    return 0
