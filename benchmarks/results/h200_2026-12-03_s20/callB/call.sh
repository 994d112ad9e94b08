# call B: tests/gpu, then decode steps with the fused residual add (f1) and without (old)
D() {
  python3 -m benchmarks.bench_decode_step --device cuda --dtype float16 --batch $1 --context 384 \
    --json $OUT/decode_b$1_$2.json >> $OUT/decode.log 2>&1
  python3 -c "import json; d=json.load(open('$OUT/decode_b$1_$2.json')); l,b=d['lora'],d['base']; print('$2 b$1 lora', l['step_ms_median'], l['bound_ms'], l['ratio_to_bound'], 'base', b['step_ms_median'], b['bound_ms'], b['ratio_to_bound'])"
}
timeout 280 python3 -m pytest -q tests/gpu -k "not smollm2" > $OUT/gpu_tests.log 2>&1; tail -n 2 $OUT/gpu_tests.log
D 64 f1; D 256 f1
patch -s -R -p1 < .devrun/f1.diff && D 64 old && D 256 old
patch -s -p1 < .devrun/f1.diff
