#!/usr/bin/env bash
# Snakemake runs this once after creating the environment, from the workflow's working directory
# (the repository root): install the core package without touching the pinned dependencies.
set -euo pipefail
python -m pip install --no-deps --quiet -e .
