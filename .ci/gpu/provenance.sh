#!/usr/bin/env bash
# Sourced first by the device scripts: every record a run writes names LAB_COMMIT, so the files here must be that
# commit's (results/ left out). Where the commit is, `python -m impl provenance <sha>` prints the prefix
# LAB_COMMIT=... LAB_TREE=... for the command, e.g. `env LAB_COMMIT=... LAB_TREE=... bash .ci/gpu/steps.sh sort`.
: "${LAB_COMMIT:?set LAB_COMMIT and LAB_TREE (python -m impl provenance <sha>): every record names its commit}"
: "${LAB_TREE:?set LAB_TREE too (python -m impl provenance <sha>): it proves these files are that commit}"
python3 -m impl provenance --check || exit 4
