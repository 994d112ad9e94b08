# Sourced after env.sh: ROW TAG ARGS... runs one harness row (R = 60 unless --rate is given,
# 25 s trace cut at 15 s, alpha 1, cv 1) into $OUT/TAG.json and .log, then prints its summary.
# HT: the row's own time limit in seconds (default 300). With vLLM (baseline e):
#   ROW s1n100 --setting S1 --n 100 --baselines b,e --vllm-modes lora --vllm-max-loras 32 \
#       --vllm-python "$IMG_PY" --vllm-pythonpath /tmp/vllm-site
# The GPU's clocks, power, temperature and throttle reasons are sampled every second through the
# row into $OUT/TAG.gpu.csv (a first engine on a fresh machine runs slower: is it the clocks?).
ROW() {
  local tag=$1; shift; local t0 rc smi; t0=$(date +%s)
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -lms 1000 > "$OUT/$tag.gpu.csv" 2>/dev/null & smi=$!
  timeout "${HT:-300}" python3 -m benchmarks.harness --alpha 1 --cv 1 --duration 25 --time-limit 15 \
    --rate 60 --device cuda --json "$OUT/$tag.json" "$@" > "$OUT/$tag.log" 2>&1
  rc=$?; kill "$smi" 2>/dev/null
  echo "== $tag rc=$rc $(( $(date +%s) - t0 ))s"
  python3 scripts/h200/summary.py "$OUT/$tag.json"
  tail -n 2 "$OUT/$tag.log" | cut -c1-300
}
