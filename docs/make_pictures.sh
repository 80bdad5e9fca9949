#!/usr/bin/env bash
# Regenerate the pictures in docs/images from the registered components (run after adding one).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/fundiff plot schedules --chain vp --out docs/images/schedules.png
.venv/bin/fundiff plot noise --chain vp --schedule cosine --out docs/images/noise.png
