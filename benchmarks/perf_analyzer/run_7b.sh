#!/usr/bin/env bash
# perf_analyzer against slora-triton serving a Llama-2-7B-shaped random-weight model on CUDA.
#
#   benchmarks/perf_analyzer/run_7b.sh OUT_DIR
#
# Run from the project root. On the lent GPU machine the .device bundle (../shared/device/
# make-bundle.sh) provides tritonserver, the stub's Python and perf_analyzer 2.60; it is sourced
# when present. What it does:
#   1. random assets: a synthetic tokenizer of the shape's vocabulary, ADAPTERS random PEFT
#      adapters (ranks round robin over RANKS, LoRA on TARGETS), prompts of PROMPT_TOKENS tokens;
#   2. python -m slora_backend.serve --base-model random:$SHAPE on $DEVICE in $DTYPE, waits for ready;
#   3. perf_analyzer -m slora over gRPC streaming at each concurrency in CONCURRENCY, every request
#      generating exactly MAX_TOKENS tokens (ignore_eos), adapters and the base model mixed;
#   4. writes OUT_DIR/{params.json, perf_c<N>.csv, perf_analyzer.log, stats.json, metrics.txt,
#      server.log, summary.md} and stops the server.
# Settings (environment): SHAPE=llama-7b DEVICE=cuda DTYPE=float16 ADAPTERS=8 RANKS=8,16,32,64
#   TARGETS=q_proj,k_proj,v_proj,o_proj MAX_TOKENS=128 PROMPT_TOKENS=128 BASE=1 (mix in base-model
#   requests) CONCURRENCY="1 8 32 64" INTERVAL_MS=8000 PORT_BASE=18000 MODEL=slora
# Smoke test on a CPU machine: SHAPE=tiny-gqa DEVICE=cpu DTYPE=float32 MAX_TOKENS=8 \
#   PROMPT_TOKENS=8 CONCURRENCY="1 2" INTERVAL_MS=2000 benchmarks/perf_analyzer/run_7b.sh /tmp/pa
set -euo pipefail
OUT=${1:?usage: run_7b.sh OUT_DIR}
SHAPE=${SHAPE:-llama-7b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}
ADAPTERS=${ADAPTERS:-8}; RANKS=${RANKS:-8,16,32,64}; TARGETS=${TARGETS:-q_proj,k_proj,v_proj,o_proj}
MAX_TOKENS=${MAX_TOKENS:-128}; PROMPT_TOKENS=${PROMPT_TOKENS:-128}; BASE=${BASE:-1}
CONCURRENCY=${CONCURRENCY:-"1 8 32 64"}; INTERVAL_MS=${INTERVAL_MS:-8000}
PORT_BASE=${PORT_BASE:-18000}; MODEL=${MODEL:-slora}
HTTP=$PORT_BASE; GRPC=$((PORT_BASE + 1)); METRICS=$((PORT_BASE + 2))

cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -f .device/setup.sh ] && command -v nvidia-smi >/dev/null 2>&1 && [ -z "${SLORA_SKIP_DEVICE_SETUP:-}" ]; then
  # shellcheck disable=SC1091
  source .device/setup.sh   # tritonserver under /opt/tritonserver, python3 with numpy 1.26
  PY=${PY:-python3}
fi
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
PA=${PERF_ANALYZER:-$(command -v perf_analyzer || echo .tools/perf_analyzer/perf_analyzer)}
[ -x "$PA" ] || { echo "no perf_analyzer: make perf-analyzer, or set PERF_ANALYZER" >&2; exit 1; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)

echo "== assets"
"$PY" benchmarks/perf_analyzer/make_random_assets.py --shape "$SHAPE" --out "$OUT/assets" \
  --adapters "$ADAPTERS" --ranks "$RANKS" --targets "$TARGETS" --prompt-tokens "$PROMPT_TOKENS" \
  --dtype "$( [ "$DTYPE" = float32 ] && echo float32 || echo float16 )"
NAMES=$(seq -s, -f 'a%g' 0 $((ADAPTERS - 1)))
"$PY" benchmarks/perf_analyzer/make_inputs.py --adapters "$NAMES" $( [ "$BASE" = 1 ] && echo --base ) \
  --ignore-eos --max-tokens "$MAX_TOKENS" --prompts-file "$OUT/assets/prompts.txt" \
  --count 64 --out "$OUT/inputs.json"

echo "== server"
"$PY" -m slora_backend.serve --base-model "random:$SHAPE" --tokenizer "$OUT/assets/tokenizer" \
  --adapter-root "$OUT/assets/adapters" --device "$DEVICE" --dtype "$DTYPE" \
  --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" --host 127.0.0.1 \
  --log-file "$OUT/server.log" --work-dir "$OUT/work" > "$OUT/launcher.log" 2>&1 &
LAUNCHER=$!
stop() { kill -TERM "$LAUNCHER" 2>/dev/null && wait "$LAUNCHER" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null 2>&1 && break
  kill -0 "$LAUNCHER" 2>/dev/null || { echo "server failed:" >&2; tail -n 30 "$OUT/launcher.log" "$OUT/server.log" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null || { echo "server not ready" >&2; exit 1; }

"$PY" - "$OUT" "$SHAPE" "$DEVICE" "$DTYPE" "$ADAPTERS" "$RANKS" "$TARGETS" "$MAX_TOKENS" \
  "$PROMPT_TOKENS" "$BASE" "$CONCURRENCY" "$INTERVAL_MS" "$MODEL" "$PA" <<'PY'
import json, platform, subprocess, sys, time
keys = ["out", "shape", "device", "dtype", "adapters", "ranks", "targets", "max_tokens",
        "prompt_tokens", "base_requests", "concurrency", "interval_ms", "model", "perf_analyzer"]
params = dict(zip(keys, sys.argv[1:]))
params["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
params["host"] = platform.node()
try:
    params["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
except OSError:
    params["gpu"] = "none"
import torch
params["torch"] = torch.__version__
pa = subprocess.run([params["perf_analyzer"], "--version"], capture_output=True, text=True)
params["perf_analyzer_version"] = (pa.stdout + pa.stderr).strip() or "perf_analyzer (version not reported)"
json.dump(params, open(f"{params['out']}/params.json", "w"), indent=1)
PY

echo "== perf_analyzer"
: > "$OUT/perf_analyzer.log"
for C in $CONCURRENCY; do
  echo "-- concurrency $C" | tee -a "$OUT/perf_analyzer.log"
  "$PA" -m "$MODEL" -u "127.0.0.1:$GRPC" -i grpc --async --streaming \
    --input-data "$OUT/inputs.json" --concurrency-range "$C" \
    --measurement-interval "$INTERVAL_MS" --stability-percentage 25 --max-trials 6 \
    -f "$OUT/perf_c$C.csv" --profile-export-file "$OUT/profile_c$C.json" \
    >> "$OUT/perf_analyzer.log" 2>&1 \
    || echo "perf_analyzer failed at concurrency $C (see perf_analyzer.log)" | tee -a "$OUT/perf_analyzer.log"
done

curl -s -X POST "http://127.0.0.1:$HTTP/v2/models/slora_adapters/infer" \
  -d '{"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["stats"]}]}' \
  > "$OUT/stats.json" || true
curl -s "http://127.0.0.1:$METRICS/metrics" > "$OUT/metrics.txt" || true

"$PY" - "$OUT" "$MAX_TOKENS" <<'PY'
import csv, glob, json, sys
out, max_tokens = sys.argv[1], int(sys.argv[2])
params = json.load(open(f"{out}/params.json"))


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def first_response_ms(concurrency):
    """Time to the first response of each request perf_analyzer timed (its profile export)."""
    try:
        export = json.load(open(f"{out}/profile_c{concurrency}.json"))
    except (OSError, ValueError):
        return []
    return [(r["response_timestamps"][0] - r["timestamp"]) / 1e6
            for e in export.get("experiments", []) for r in e.get("requests", [])
            if r.get("response_timestamps")]


rows = []
for path in glob.glob(f"{out}/perf_c*.csv"):
    rows += list(csv.DictReader(open(path)))
rows.sort(key=lambda r: int(r["Concurrency"]))
lines = [f"# perf_analyzer: {params['model']} on random:{params['shape']} ({params['dtype']}, {params['device']})",
         "", f"- date: {params['date']}; GPU: {params['gpu']}; torch {params['torch']}; {params['perf_analyzer_version']}",
         f"- {params['adapters']} adapters, ranks {params['ranks']} on {params['targets']}; base-model requests mixed in: {params['base_requests']}",
         f"- every request: {params['prompt_tokens']} prompt tokens, {max_tokens} output tokens (ignore_eos), gRPC streaming",
         "- output tokens/s = requests/s x output tokens (the server may merge several tokens into one response);",
         "  request latency = perf_analyzer's, to a request's last response; first response = from its profile export",
         "", "| concurrency | requests/s | output tokens/s | request latency p50 / p99 (ms) | first response p50 / p90 / p99 (ms) |",
         "| --- | --- | --- | --- | --- |"]
for r in rows:
    first = first_response_ms(r["Concurrency"])
    lines.append(f"| {r['Concurrency']} | {float(r['Inferences/Second']):.2f} | "
                 f"{float(r['Inferences/Second']) * max_tokens:.0f} | "
                 f"{int(r['p50 latency']) / 1000:.0f} / {int(r['p99 latency']) / 1000:.0f} | "
                 f"{pct(first, 0.5):.0f} / {pct(first, 0.9):.0f} / {pct(first, 0.99):.0f} |")
if not rows:
    lines.append("| (no successful measurement: see perf_analyzer.log) | | | | |")
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
