#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: set-up, then `medseg demo` (a synthetic CT
# study through reader, shipped default model with Monte-Carlo uncertainty, SEG + Parametric Map + SR,
# gate, preview and summary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medseg demo -o "${1:-medseg-demo}"
