"""ONNX export (``llmq.onnx``): checker, onnxruntime logits against llmq's modules, refusals, CLI, atomicity.

Tolerances (max |Δ logit| on a tiny random Llama whose logits reach ~4):

* ``EXACT`` = 1e-4 — float and weight-only (int2/3/4/8, sym/asym, partial last group): the graph
  computes the same products in fp32 from the same codes; only summation order differs;
* ``ROUNDING`` = 5e-2 max and 2e-3 mean — everything with a QuantizeLinear (W8A8 static and dynamic,
  QAT weights): onnxruntime's QuantizeLinear
  and torch round ``x / s`` from differently computed quotients, so a value within an ulp of .5
  can land on the other code (one step of one activation or weight); greedy tokens must agree.
"""

import json

import onnx
import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from llmq.cli.main import main as cli
from llmq.model.rtn import quantize_model_rtn
from llmq.nn import set_backend
from llmq.nn.quant_linear import QuantLinear
from llmq.onnx import OnnxCausalLM, export_onnx
from llmq.qat import prepare_qat
from llmq.recipes import ActivationRecipe, WeightRecipe
from llmq.w8a8 import quantize_model_w8a8

EXACT, ROUNDING = "exact", "rounding"


def ids(batch=1, seq=40, seed=1):
    return torch.randint(0, 320, (batch, seq), generator=torch.Generator().manual_seed(seed))


def outlier_llama():
    m = make_tiny_llama()  # hidden 64, intermediate 160: a 64-group leaves a partial last group in down_proj
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[5] = 20.0
    return m


def rtn(bits, group, sym):
    def make():
        m = outlier_llama()
        quantize_model_rtn(m, WeightRecipe(bits=bits, group_size=group, symmetric=sym), progress=False)
        return m
    return make


def w8a8(recipe):
    def make():
        m = outlier_llama()
        quantize_model_w8a8(m, recipe, [ids(1, 32, s) for s in range(3)], progress=False)
        return m
    return make


def qat(bits, group, sym):
    def make():
        m = outlier_llama()
        prepare_qat(m, WeightRecipe(bits=bits, group_size=group, symmetric=sym))
        return m
    return make


CASES = {
    "float": (outlier_llama, EXACT),
    "int4-g64-sym": (rtn(4, 64, True), EXACT),
    "int4-g32-asym": (rtn(4, 32, False), EXACT),
    "int8-channel-sym": (rtn(8, None, True), EXACT),
    "int8-g64-asym": (rtn(8, 64, False), EXACT),
    "int3-g32-asym": (rtn(3, 32, False), EXACT),
    "int2-g32-sym": (rtn(2, 32, True), EXACT),
    "w8a8-static-kl": (w8a8(ActivationRecipe(scheme="static", observer="kl")), ROUNDING),
    "w8a8-static-percentile-nosq": (w8a8(ActivationRecipe(scheme="static", observer="percentile",
                                                           smoothquant_alpha=None)), ROUNDING),
    "w8a8-dynamic": (w8a8(ActivationRecipe(scheme="dynamic")), ROUNDING),
    "qat-int4-g32-sym": (qat(4, 32, True), ROUNDING),
    "qat-int4-g64-asym": (qat(4, 64, False), ROUNDING),
    "qat-int8-channel": (qat(8, None, False), ROUNDING),
}


def assert_logits_match(ref, got, tier):
    diff = (ref - got).abs()
    if tier == EXACT:
        assert diff.max() < 1e-4, float(diff.max())
    else:
        assert diff.max() < 5e-2 and diff.mean() < 2e-3, (float(diff.max()), float(diff.mean()))
        assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_onnxruntime_logits_match_llmq_modules(tmp_path, case):
    make, tier = CASES[case]
    model = make()
    res = export_onnx(model, tmp_path / "o")
    proto = onnx.load(str(res.model_file))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 21
    x = ids(2, 40)
    set_backend(model, "torch")  # the reference: on CPU the automatic choice is the bf16 `cpu` backend
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
    got = OnnxCausalLM(res.path)(input_ids=x).logits
    assert got.shape == ref.shape
    assert_logits_match(ref, got, tier)


def _ops(path):
    return [n for n in onnx.load(str(path)).graph.node]


def test_w8a8_static_graph_is_tensorrt_explicit_quantization(tmp_path):
    res = export_onnx(w8a8(ActivationRecipe(scheme="static", observer="minmax"))(), tmp_path / "o")
    g = onnx.load(str(res.model_file)).graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    matmuls = [n for n in g.node if n.op_type == "MatMul" and n.name.startswith("model.layers.0.self_attn.q_proj")]
    (mm,) = matmuls
    act, weight = producers[mm.input[0]], producers[mm.input[1]]
    assert act.op_type == "DequantizeLinear" and producers[act.input[0]].op_type == "QuantizeLinear"
    assert inits[act.input[1]].dims == []  # per-tensor activation scale: a constant scalar
    assert inits[act.input[2]].data_type == onnx.TensorProto.INT8  # zero point int8 0
    assert weight.op_type == "DequantizeLinear"
    assert inits[weight.input[0]].data_type == onnx.TensorProto.INT8 and list(inits[weight.input[0]].dims) == [64, 64]
    assert list(inits[weight.input[1]].dims) == [64]  # per output channel
    assert next(a.i for a in weight.attribute if a.name == "axis") == 1


def test_int4_weights_are_blocked_int4(tmp_path):
    res = export_onnx(rtn(4, 32, False)(), tmp_path / "o")
    g = onnx.load(str(res.model_file)).graph
    inits = {i.name: i for i in g.initializer}
    dq = next(n for n in g.node if n.name.startswith("model.layers.0.mlp.down_proj/weight"))
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    assert inits[dq.input[0]].data_type == onnx.TensorProto.UINT4 and list(inits[dq.input[0]].dims) == [160, 64]
    assert list(inits[dq.input[1]].dims) == [5, 64]  # ceil(160 / 32) groups
    assert inits[dq.input[2]].data_type == onnx.TensorProto.UINT4


def test_fixed_sequence_axis(tmp_path):
    model = rtn(4, 64, True)()
    res = export_onnx(model, tmp_path / "o", seq_len=16)
    inp = onnx.load(str(res.model_file)).graph.input[0]
    assert [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", 16]
    x = ids(1, 16)
    set_backend(model, "torch")  # the reference, not the bf16 `cpu` backend
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
    assert_logits_match(ref, OnnxCausalLM(res.path)(input_ids=x).logits, EXACT)
    with pytest.raises(Exception, match="(?i)dim|shape"):
        OnnxCausalLM(res.path)(input_ids=ids(1, 17))


def test_float_zeros_are_refused_and_nothing_is_written(tmp_path):
    model = make_tiny_llama()
    lin = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = QuantLinear(lin.in_features, lin.out_features, 4, 32, False,
                                                    zero_point="float")
    with pytest.raises(ValueError, match="zero-point int"):
        export_onnx(model, tmp_path / "o")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_qat_below_4_bits_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="convert_qat"):
        export_onnx(qat(3, 32, False)(), tmp_path / "o")


def test_other_architectures_and_modules_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type 'llama'"):
        export_onnx(nn.Sequential(nn.Linear(4, 4)), tmp_path / "o")
    model = make_tiny_llama()
    model.model.layers[0].mlp.up_proj = nn.Sequential(nn.Linear(64, 160))
    with pytest.raises(Exception):
        export_onnx(model, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_exports_a_checkpoint_atomically(tmp_path, tiny_model_dir):
    from llmq.api import quantize

    ckpt = tmp_path / "ckpt"
    quantize(tiny_model_dir, WeightRecipe(bits=4, group_size=64, symmetric=False), ckpt, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    out = tmp_path / "onnx"
    assert cli(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((out / "llmq_onnx.json").read_text())
    assert meta["opset"] == 21 and meta["linears"]["QuantLinear-int4-g64-asym"] == 14
    assert (out / "tokenizer.json").exists() and (out / "model.onnx").exists()
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before  # the source is only read
    assert cli(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) != 0  # non-empty without --force
    assert cli(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--force", "--seq-len", "8"]) == 0
    assert json.loads((out / "llmq_onnx.json").read_text())["seq_len"] == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    from llmq.api import load

    model, _ = load(ckpt, dtype=torch.float32)
    set_backend(model, "torch")  # the reference, not the bf16 `cpu` backend
    x = ids(1, 8)
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
    assert_logits_match(ref, OnnxCausalLM(out)(input_ids=x).logits, EXACT)


@pytest.mark.parametrize("case", ["float", "int4-g32-asym", "w8a8-static-kl", "w8a8-dynamic"])
def test_kv_cache_graph_decodes_as_the_full_sequence_prefill(tmp_path, case):
    """Prompt (P = 0) then single-token steps fed their own ``present`` outputs give the logits of
    one prefill over the whole sequence, and the cache grows by one token per step."""
    make, tier = CASES[case]
    model = make()
    res = export_onnx(model, tmp_path / "o", kv_cache=True)
    proto = onnx.load(str(res.model_file))
    onnx.checker.check_model(proto, full_check=True)
    layers, cfg = len(model.model.layers), model.config
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert len(proto.graph.output) == 1 + 2 * layers and proto.graph.output[-1].name == f"present.{layers - 1}.value"
    x = ids(2, 12)
    set_backend(model, "torch")
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
    lm = OnnxCausalLM(res.path)
    out = lm(input_ids=x[:, :8], use_cache=True)
    steps = [out.logits]
    for t in range(8, 12):
        out = lm(input_ids=x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert_logits_match(ref, torch.cat(steps, dim=1), tier)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert out.past_key_values[0][0].shape == (2, cfg.num_key_value_heads, 12, head_dim)
    assert_logits_match(ref, lm(input_ids=x).logits, tier)  # no past given: the prefill that perplexity runs


def test_kv_cache_misuse_is_refused(tmp_path, tiny_model_dir, capsys):
    model = rtn(4, 64, True)()
    with pytest.raises(ValueError, match="leave seq_len unset"):
        export_onnx(model, tmp_path / "fixed", seq_len=8, kv_cache=True)
    res = export_onnx(model, tmp_path / "prefill")
    with pytest.raises(ValueError, match="--kv-cache"):
        OnnxCausalLM(res.path)(input_ids=ids(1, 4), use_cache=True)
    assert cli(["export", str(tiny_model_dir), "--format", "gptq", "--out", str(tmp_path / "g"), "--kv-cache"]) != 0
    assert "--kv-cache apply to --format onnx only" in capsys.readouterr().err
