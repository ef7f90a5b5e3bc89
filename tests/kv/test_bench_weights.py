"""``llmq bench --weights``: the quantized-weight choices run on the CPU's cpu backend, and the report
says which backend and how many threads."""

import json

from llmq.kv.bench import main


def test_bench_int8_and_int4_g64_weights_report_backend_and_threads(tiny_model_dir, tmp_path):
    rc = main(["--model", str(tiny_model_dir), "--contexts", "20", "--kv", "fp", "--weights", "int8", "int4-g64",
               "--new-tokens", "2", "--no-batch-search", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench_generate.json").read_text())
    assert report["threads"] >= 1
    # the tiny Llama's Linears all have N % 16 == 0: every layer runs the cpu backend
    assert report["quant_linear_backends"] == ["int4-g64: cpu", "int8: cpu"]
    assert {r["weights"] for r in report["runs"]} == {"int8", "int4-g64"}
    assert all(r["decode_tokens_per_s"] > 0 for r in report["runs"])


def test_head8_weights_quantize_the_output_head_int8(tiny_model_dir):
    import torch

    from llmq.kv.bench import build_model
    from llmq.nn import QuantLinear

    plain, _ = build_model(str(tiny_model_dir), "int4", torch.device("cpu"), torch.float32)
    model, nbytes = build_model(str(tiny_model_dir), "int4-head8", torch.device("cpu"), torch.float32)
    assert type(plain.lm_head) is torch.nn.Linear
    assert isinstance(model.lm_head, QuantLinear) and (model.lm_head.bits, model.lm_head.group_size) == (8, None)
    assert model.model.layers[0].mlp.down_proj.bits == 4 and nbytes > 0
