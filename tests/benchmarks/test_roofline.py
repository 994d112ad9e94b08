"""The roofline's arithmetic on a shape small enough to count by hand."""

from __future__ import annotations

import pytest

from benchmarks import roofline
from benchmarks.roofline import ModelShape, TraceRequest

# hidden 8, 2 heads of 4, 1 KV head, MLP 16, 2 layers, vocab 32, fp16
TINY = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=32)
REQUESTS = [TraceRequest(prompt_len=3, output_len=2, adapter="a", rank=2),
            TraceRequest(prompt_len=1, output_len=3, adapter="b", rank=4)]


def test_shape_sizes():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3 x 8 x 16 = 384
    assert TINY.layer_params == 2 * (192 + 384) == 1152
    # + LM head 256, norms (2 x 2 + 1) x 8 = 40, 2 embedding rows of 8; 2 bytes each
    assert TINY.step_weight_bytes(2) == (1152 + 256 + 40 + 16) * 2 == 2928
    assert TINY.kv_bytes_per_token == 2 * 2 * 4 * 2 == 32
    # q (8+8) + k (8+4) + v (8+4) + o (8+8) = 56 per rank per layer
    assert TINY.adapter_bytes(2) == 2 * 2 * 56 * 2 == 448
    tied = ModelShape(8, 16, 2, 2, 1, 32, tied_embeddings=True)
    assert tied.step_weight_bytes(2) == (1152 + 256 + 40) * 2


def test_trace_work_counted_by_hand():
    w = roofline.trace_work(TINY, REQUESTS, batch=2)
    # decode tokens: a's 2nd token (context 3 + 1 = 4); b's 2nd and 3rd (contexts 2, 3)
    assert w["decode_tokens"] == 3 and w["decode_steps"] == 1.5
    assert w["kv_read_bytes"] == (4 + 2 + 3) * 32 and w["kv_write_bytes"] == 3 * 32
    # decode-token shares a 1/3, b 2/3; 2 draws: a present with 1 - (2/3)^2, b with 1 - (1/3)^2
    per_step = (1 - (2 / 3) ** 2) * 448 + (1 - (1 / 3) ** 2) * 896
    assert w["adapter_bytes_per_step"] == pytest.approx(per_step)
    assert w["distinct_adapters_per_step"] == pytest.approx(5 / 9 + 8 / 9)
    assert w["decode_bytes"] == pytest.approx(1.5 * (2928 + per_step) + 288 + 96)
    # linear 2 x (1152 + 256) per decode token, attention 4 x 2 x 8 per position,
    # LoRA 2 x 2 x r x 56 per token (a: 1 token r 2, b: 2 tokens r 4)
    assert w["decode_flops"] == 3 * 2816 + 64 * 9 + 448 + 2 * 896
    # prompt tokens without the LM head (4 x 2304), one LM head per request (2 x 512),
    # causal attention 64 x P(P+1)/2 (a: 6 positions, b: 1), LoRA (a: 3 x 448, b: 1 x 896)
    assert w["prefill_flops"] == 4 * 2304 + 2 * 512 + 64 * 7 + 3 * 448 + 896


def test_bound_and_batch():
    w = roofline.trace_work(TINY, REQUESTS, batch=2)
    b = roofline.bound(w, bandwidth=1000.0, matmul_flops=1e5)
    decode = max(w["decode_bytes"] / 1000.0, w["decode_flops"] / 1e5)
    assert b["serial_s"] == pytest.approx(decode + w["prefill_flops"] / 1e5)
    assert b["overlap_s"] == pytest.approx(max(w["decode_bytes"] / 1000.0,
                                               (w["decode_flops"] + w["prefill_flops"]) / 1e5))
    assert b["req_s_serial"] == pytest.approx(2 / b["serial_s"]) and b["overlap_s"] <= b["serial_s"]
    # KV room (memory - weights) / 32 B per token; a request holds P + O (mean 4.5 tokens)
    memory = TINY.step_weight_bytes(0) + 32 * 4.5 * 3
    assert roofline.achievable_batch(TINY, REQUESTS, 256, memory) == 3
    assert roofline.achievable_batch(TINY, REQUESTS, 2, memory) == 2


def test_cli_rows_on_the_harness_trace(capsys):
    rows = roofline.main(["--cases", "S1:5,S2:100", "--duration", "2"])
    assert [(r["setting"], r["n"], r["batch"]) for r in rows] == [("S1", 5, 256), ("S2", 100, 256)]
    assert rows[0]["weight_bytes_per_step"] == pytest.approx(13.2e9, rel=0.01)  # Llama-2-7B fp16
    assert rows[1]["adapter_bytes_per_step"] > rows[0]["adapter_bytes_per_step"]
    out = capsys.readouterr().out
    assert "| bound req/s (serial) |" in out and out.count("\n| S") == 2
    with pytest.raises(ValueError, match="SETTING:N"):
        roofline.parse_cases("S1-5")
