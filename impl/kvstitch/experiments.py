"""The kvstitch recipe from the command line (the recipe itself: ``recipe.py``; rescoring: ``rescore.py``).

  python -m impl.kvstitch.experiments --smoke                  CPU, tiny random models, byte tokenizer, writes nothing
  python -m impl.kvstitch.experiments --check --assets DIR     CPU or GPU: the real models through every stage at smoke
                                                               sizes (minutes on a CPU), writes nothing
  python -m impl.kvstitch.experiments --quick --assets DIR     GPU: two decode sizes per series, short training
                                                               (~6-7 min per series with the runtimes on an H200)
  python -m impl.kvstitch.experiments --assets DIR             GPU: the same with twice the training steps
  python -m impl.kvstitch.experiments rescore --slug SLUG      fill in ROUGE of stored generations (needs rouge-score)

``DIR`` (default ``$KVSTITCH_ASSETS`` or ``.carry/kvstitch``) holds what ``prepare`` wrote (see ``recipe.py``).
Exit code 0 when something ran; 2 when no series had its model, or a GPU run finds no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import impl  # noqa: F401
    import torch
    from transformers.utils import logging as hf_logging

    from impl.kvstitch.recipe import brief, log, run_all
    from impl.kvstitch.rescore import RescoreRefused, rescore

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    p = argparse.ArgumentParser(prog="python -m impl.kvstitch.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "rescore"])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny random models; writes nothing")
    p.add_argument("--check", action="store_true", help="real models at smoke sizes (CPU ok); writes nothing")
    p.add_argument("--quick", action="store_true", help="both decode sizes, half the training steps")
    p.add_argument("--assets", default=None,
                   help="dir written by `prepare` (text/, <series>.gguf or <series>/); default $KVSTITCH_ASSETS or "
                        ".carry/kvstitch")
    p.add_argument("--series", default="smollm2,gemma3")
    p.add_argument("--skip-runtime", action="store_true")
    p.add_argument("--workdir", default=None, help="keep models/checkpoints here (default: a temp dir)")
    p.add_argument("--slug", default=None, help="rescore: results/<slug>/")
    a = p.parse_args(argv)
    if a.command == "rescore":
        if not a.slug:
            p.error("rescore needs --slug")
        try:
            return rescore(a.slug)
        except RescoreRefused as e:
            print(f"rescore: {e}", file=sys.stderr)
            return 2
    if a.assets is None and not a.smoke:
        a.assets = os.environ.get("KVSTITCH_ASSETS", ".carry/kvstitch")
    mode = "smoke" if a.smoke else "check" if a.check else "quick" if a.quick else "full"
    if mode in ("quick", "full") and not torch.cuda.is_available():
        print("the recipe needs a CUDA GPU; use --smoke or --check on a CPU", file=sys.stderr)
        return 2
    out = run_all(mode, a.series.split(","), assets=a.assets, workdir=a.workdir, skip_runtime=a.skip_runtime)
    if not out:
        log("nothing ran: no model found for any series")
        return 2
    for k, v in out.items():
        log(f"{k}: {json.dumps(brief(v))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
