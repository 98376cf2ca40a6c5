# Sourced by the gpu_session*.sh scripts: run from the repository root, OUT made, the card noted.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[1]}")/.."
out="$1"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
