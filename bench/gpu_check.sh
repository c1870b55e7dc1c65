#!/usr/bin/env bash
# The GPU checks of one device session: GPU tests, training-step throughput and MFU, generation speed,
# written as JSON to bench/results/ (and to $OUT when set, so the device tool brings them back).
#
#   bash bench/gpu_check.sh prepare   # here (any machine with pip and the registry): wheels into .whl/
#   bash bench/gpu_check.sh run       # on the GPU machine, with .whl carried: install, test, bench (< 8 min)
#
# The GPU machine has python3 3.12 with torch, transformers, sentencepiece, tensorboard and xxhash, but
# no megatron-core and no registry: `prepare` downloads the missing wheels for CPython 3.12 manylinux
# (pure-Python or binary), `run` installs them into /tmp/site with --no-index. transformer-engine is not
# carried (its torch extension must be built against the machine's torch): without it the models use
# Megatron's local layers and the JSON says so.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.whl
RESULTS=bench/results
# What the image lacks for the GPU tests and benches: the megatron-core pin of constraints-cpu.txt.
PACKAGES=(megatron-core==0.16.1)

prepare() {
    mkdir -p "$WHEELS"
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >>.git/info/exclude
    local platforms=()
    for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
}

stage() { # stage NAME SECONDS COMMAND...: run with a time limit; record status and seconds in the summary
    local name="$1" limit="$2" started status=0
    shift 2
    started=$(date +%s)
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1 || status=$?
    echo "{\"stage\": \"$name\", \"status\": $status, \"seconds\": $(($(date +%s) - started))}" >>"$LOGS/stages.jsonl"
    tail -n 5 "$LOGS/$name.log"
    echo "gpu_check: $name exited $status"
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    LOGS="${OUT:-/tmp/gpu_check}"
    mkdir -p "$LOGS" "$RESULTS"
    : >"$LOGS/stages.jsonl"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$LOGS/gpu.txt" || true
    python3 -c "import transformer_engine" >/dev/null 2>&1 && te=true || te=false
    stage gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_vocab_parallel_gpu.py \
        tests/test_packing_gpu.py
    stage step_mfu 200 python3 bench/step.py --student qwen3_1_7b --teacher qwen3_1_7b --world-size 1 --tp 1 \
        --sequences 8 --seq-len 2048 --out "$RESULTS/gpu_step.json"
    stage packing 100 python3 bench/step.py --length-mix --student qwen3_1_7b --teacher qwen3_1_7b \
        --world-size 1 --sequences 16 --seq-len 2048 --steps 2 --out "$RESULTS/gpu_step_packing.json"
    stage generation 120 python3 bench/generation.py --layers 8 --hidden 1024 --batch 32 --new-tokens 128 \
        --out "$RESULTS/gpu_generation.json"
    python3 - "$LOGS" "$RESULTS" "$te" <<'EOF'
import json, pathlib, sys
logs, results, te = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "true"
summary = {
    "gpu": (logs / "gpu.txt").read_text().strip() if (logs / "gpu.txt").exists() else "",
    "transformer_engine": te,
    "packed_thd_attention": "tests/test_packing_gpu.py (gpu_tests) and the packing stage",
    "stages": [json.loads(line) for line in (logs / "stages.jsonl").read_text().splitlines()],
}
for name in ("gpu_step.json", "gpu_step_packing.json", "gpu_generation.json"):
    if (results / name).exists():
        summary[name] = json.loads((results / name).read_text())
(results / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["stages"]))
EOF
    [[ -z "${OUT:-}" ]] || cp "$RESULTS"/gpu_*.json "$OUT"/
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
