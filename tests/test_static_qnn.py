"""`export --target qnn` for real: the A16W8/A16W4 static pair on the x86-64 Hexagon HTP
simulator (onnxruntime-qnn), with CPU fallback disabled and QNN's op trace as the proof that
every node of both graphs runs on the HTP.

Bounds: the HTP must give exactly the greedy tokens of the same Q/DQ graph emulated on the CPU
EP (a graph the HTP computes differently fails at once: measured with per-channel MatMul
weights, which place fine but give unrelated tokens), and its teacher-forced logits must
correlate with the FP32 export's; a misaligned comparison (the negative control) is far below.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

import edgesdk
from edgesdk import artifact, targets
from edgesdk.runtime.session import create_session
from edgesdk.runtime.static_decoder import StaticDecoder

from conftest import run_cli
from test_static import CHUNK, CONTEXT, PROMPTS, TEXT, correlation

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None,
                                reason="onnxruntime-qnn is not installed (pip install 'edgesdk[qnn]')")

_exports: dict = {}


def qnn_export(tiny, arch: str, precision: str) -> Path:
    key = (arch, precision)
    if key not in _exports:
        out = tiny.root / f"qnn-{arch}-{precision}"
        if not out.exists():  # through the CLI, so --context/--chunk/--calibration run for real
            cal = tiny.root / "calibration.txt"
            cal.write_text((Path(edgesdk.__file__).parent / "exporters/data/calibration.txt").read_text())
            p = run_cli("export", str(tiny.model(arch)), "--target", "qnn", "--precision", precision, "--context",
                        str(CONTEXT), "--chunk", str(CHUNK), "--calibration", str(cal), "-o", str(out), "-q")
            assert p.returncode == 0, p.stderr
        _exports[key] = out
    return _exports[key]


def on_htp(art: Path, trace: Path) -> StaticDecoder:
    """Both graphs on QNN alone (CPU fallback disabled), with QNN's op trace written under ``trace``."""
    man = artifact.read(art).manifest
    qnn = targets.load("qnn").providers[0]
    sessions = {}
    for g in ("prefill", "decode"):
        opts = dict(qnn["options"], enable_framework_op_trace=1, framework_op_trace_dir=str(trace / g))
        sessions[g] = create_session(art / f"{g}.onnx", [(qnn["name"], opts)],
                                     extra={"session.disable_cpu_ep_fallback": "1"})
        assert sessions[g].get_providers()[0] == "QNNExecutionProvider"
    return StaticDecoder(art, man["model"]["static"], sessions["prefill"], sessions["decode"])


def greedy(decoder, ids: list[int], n: int) -> list[int]:
    decoder.rewind(0)
    x = decoder.forward(ids)[-1]
    out = []
    for _ in range(n):
        out.append(int(x.argmax()))
        x = decoder.forward([out[-1]])[-1]
    return out


# int4: block-wise 4-bit weights (measured HTP vs FP32 corr: llama 0.830, qwen2 0.856; the same
# graphs with per-channel 4-bit weights: 0.816, 0.818, below these bounds)
@pytest.mark.parametrize("arch,precision,min_corr", [("llama", "int8", 0.99), ("qwen2", "int8", 0.99),
                                                     ("llama", "int4", 0.82), ("qwen2", "int4", 0.84)])
def test_qnn_pair_runs_wholly_on_the_htp_simulator(tiny, tmp_path, arch, precision, min_corr):
    art = qnn_export(tiny, arch, precision)
    man = json.loads((art / "edgesdk.json").read_text())
    q = man["quantization"]
    assert q["scheme"] == {"int8": "A16W8", "int4": "A16W4"}[precision] and q["activations"] == "uint16"
    assert q["calibration"] == "calibration.txt" and q["method"] == "MinMax"
    dec = on_htp(art, tmp_path)
    for g in ("prefill", "decode"):  # the op trace: every ONNX node of both graphs on the HTP
        trace = json.loads(next((tmp_path / g).rglob("qnn_op_trace.json")).read_text())
        s = trace["summary"]
        nodes = len(onnx.load(str(art / f"{g}.onnx"), load_external_data=False).graph.node)
        assert trace["backend_type"] == "htp" and trace["unsupported_nodes"] == []
        # onnxruntime's graph optimizer duplicates shared DequantizeLinear nodes before QNN sees them
        assert s["unsupported_nodes"] == 0 and s["supported_nodes"] == s["total_onnx_nodes"] >= nodes, s
        assert s["qnn_subgraphs"] == 1
        ops = {n.op_type for n in onnx.load(str(art / f"{g}.onnx"), load_external_data=False).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Softmax", "Gemm"} <= ops

    cpu = edgesdk.load(art, target="cpu")  # the same Q/DQ graph, emulated by the CPU EP
    ref = edgesdk.load(tiny.export(arch, "fp32"))
    text = ref.tokenizer.encode(TEXT)
    assert len(text) > 2 * CHUNK  # padded prefill chunks
    dec.rewind(0)
    htp = dec.forward(text)
    emulated, fp32 = cpu.decoder.forward(text), ref.decoder.forward(text)
    # the HTP computes the graph the CPU emulates (16-bit rounding apart)
    corr, top1 = correlation(emulated, htp), float((emulated.argmax(-1) == htp.argmax(-1)).mean())
    assert corr >= 0.995 and top1 >= 0.8, (corr, top1)
    assert correlation(emulated[1:], htp[:-1]) < 0.3  # a misaligned (wrong) answer is far below
    # and the quantized graph stays close to FP32 (tiny random models are chaotic: int4 is held to correlation)
    corr32, top1_32 = correlation(fp32, htp), float((fp32.argmax(-1) == htp.argmax(-1)).mean())
    prompt = cpu.tokenizer.encode(PROMPTS[1])
    tokens = [greedy(d, prompt, 8) for d in (dec, cpu.decoder, ref.decoder)]
    print(f"{arch} {precision} on the HTP: vs its CPU emulation corr {corr:.4f} top1 {top1:.2f}; vs FP32 corr "
          f"{corr32:.4f} top1 {top1_32:.2f}; greedy tokens equal to emulation/FP32: "
          f"{sum(x == y for x, y in zip(tokens[0], tokens[1]))}/8, {sum(x == y for x, y in zip(tokens[0], tokens[2]))}/8")
    assert corr32 >= min_corr and correlation(fp32[1:], htp[:-1]) < 0.3
    if precision == "int8":
        assert top1_32 >= 0.75


def test_a16w4_weights_are_block_wise_and_closer_to_fp32_than_per_channel(tiny):
    """A16W4's layer weights are 4-bit per block of their input dimension (the HTP takes them whole:
    test above), requantized from the FP32 weights: each is closer to its FP32 weight than 4-bit
    per-channel can be; the lm_head stays 8-bit per-channel."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    art = qnn_export(tiny, "llama", "int4")
    q = artifact.read(art).manifest["quantization"]
    # blocks of 64 where K has two or more of them (down_proj, K=128); K=64 takes two blocks of 32
    assert q["per_channel"] is False and q["block_size"] == 64 and q["block_sizes"] == [32, 64], q
    fp32 = tiny.export("llama", "fp32")
    ref = {t.name: t for t in onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph.initializer}
    for g in ("prefill", "decode"):
        m = onnx.load(str(art / f"{g}.onnx"), load_external_data=False)
        inits = {t.name: t for t in m.graph.initializer}
        ratios = []
        for n in m.graph.node:
            if n.op_type != "DequantizeLinear" or not n.input[0].endswith(".T_quantized"):
                continue
            attrs = {a.name: a.i for a in n.attribute}
            w = numpy_helper.to_array(ref[n.input[0][:-len(".T_quantized")]], str(fp32)).T  # W^T [out, in]
            qw = numpy_helper.to_array(inits[n.input[0]], str(art)).astype(np.float32)
            scale = numpy_helper.to_array(inits[n.input[1]], str(art))
            if n.input[0].startswith("lm_head"):
                assert inits[n.input[0]].data_type == TensorProto.INT8 and attrs == {"axis": 0}
                continue
            block = attrs["block_size"]
            assert inits[n.input[0]].data_type == TensorProto.INT4 and attrs["axis"] == 1 and block in (32, 64)
            assert scale.shape == (w.shape[0], w.shape[1] // block)
            err = np.linalg.norm(w - qw * np.repeat(scale, block, axis=1))
            s = np.abs(w).max(1, keepdims=True) / 7
            ratios.append(err / np.linalg.norm(w - np.clip(np.rint(w / s), -8, 7) * s))
        assert len(ratios) == 10 and max(ratios) < 0.97 and np.mean(ratios) < 0.93, ratios


def test_load_picks_qnn_and_a_cpu_draft_speculates_for_it(tiny):
    """load(target="qnn") runs both graphs on QNN; a dynamic CPU draft proposing for the NPU target
    gives exactly the tokens of plain NPU decoding."""
    art = qnn_export(tiny, "llama", "int8")
    npu = edgesdk.load(art, target="qnn")
    assert npu.providers[0] == "QNNExecutionProvider" and npu.provider_notes == []
    assert npu.decoder.graphs["prefill"].session.get_providers()[0] == "QNNExecutionProvider"
    assert edgesdk.load(art).providers[0] == "QNNExecutionProvider"  # target="auto": the NPU first
    spec = edgesdk.load(art, target="qnn", draft=tiny.export("llama", "fp32"), draft_target="cpu")
    assert spec.draft.providers == ["CPUExecutionProvider"]
    a = npu.generate(PROMPTS[1], max_new_tokens=10)
    b = spec.generate(PROMPTS[1], max_new_tokens=10, num_draft_tokens=3)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_ep_context_binaries_load_fast_and_decode_the_same(tiny, tmp_path):
    """export --ep-context compiles each static graph into a QNN context binary (EPContext model),
    recorded in the manifest; load(target="qnn") runs those, token for token like the portable
    graphs; the CPU still runs the portable graphs of the same artifact."""
    import time

    plain = qnn_export(tiny, "llama", "int8")
    out = tmp_path / "ctx"
    p = run_cli("export", str(tiny.model("llama")), "--target", "qnn", "--context", str(CONTEXT), "--chunk",
                str(CHUNK), "--calibration", str(tiny.root / "calibration.txt"), "--ep-context", "-o", str(out), "-q")
    assert p.returncode == 0, p.stderr
    man = artifact.read(out).manifest
    ctx = man["model"]["static"]["ep_context"]
    assert ctx["provider"] == "QNNExecutionProvider" and ctx["options"]["soc_model"] == 60
    assert ctx["graphs"] == {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}
    for name in [*ctx["graphs"].values(), *ctx["binaries"]]:
        assert name in man["files"]  # checksummed (and signed) like every other file
    for g in ctx["graphs"].values():
        assert {n.op_type for n in onnx.load(str(out / g)).graph.node} == {"EPContext"}
    t = time.perf_counter()
    compiled = edgesdk.load(out, target="qnn", strict=True)
    t_compiled = time.perf_counter() - t
    t = time.perf_counter()
    portable = edgesdk.load(plain, target="qnn", strict=True)
    t_portable = time.perf_counter() - t
    print(f"load on the HTP simulator: context binaries {t_compiled:.2f} s, portable graphs {t_portable:.2f} s")
    assert compiled.decoder.compiled and not portable.decoder.compiled
    a = compiled.generate(PROMPTS[1], max_new_tokens=8)
    assert a.token_ids == portable.generate(PROMPTS[1], max_new_tokens=8).token_ids
    cpu = edgesdk.load(out, target="cpu")
    assert not cpu.decoder.compiled and cpu.generate(PROMPTS[1], max_new_tokens=2).generated_tokens == 2
    # where it does not apply: one line, before any work
    from conftest import assert_one_line_error

    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "--target", "cpu", "--ep-context",
                                  "-o", str(tmp_path / "no")), "--ep-context", "static targets")
    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "--target", "coreml", "--ep-context",
                                  "-o", str(tmp_path / "no")), "--ep-context compiles QNN context binaries")
    assert not (tmp_path / "no").exists()


def test_strict_places_every_node_or_names_the_one_the_npu_refuses(tiny):
    """strict=True on an NPU artifact disables CPU fallback node by node: the static pair loads
    (every node on the HTP); a graph with nodes QNN cannot take (the builder's dynamic graph:
    GroupQueryAttention, SkipSimplifiedLayerNormalization...) is a one-line error naming one."""
    from edgesdk.errors import TargetError

    strict = edgesdk.load(qnn_export(tiny, "llama", "int8"), target="qnn", strict=True)
    assert strict.providers[0] == "QNNExecutionProvider"
    assert strict.generate(PROMPTS[1], max_new_tokens=4).generated_tokens == 4
    dynamic = tiny.export("llama", "fp32")
    graph = onnx.load(str(dynamic / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in graph.graph.node}
    qnn = targets.load("qnn").providers[0]
    with pytest.raises(TargetError) as e:
        create_session(dynamic / "model.onnx", [(qnn["name"], qnn["options"])],
                       extra={"session.disable_cpu_ep_fallback": "1"})
    msg = str(e.value)
    assert "\n" not in msg and "CPU fallback is disabled" in msg, msg
    named = msg.split("does not support node ", 1)[1].split(" (", 1)
    assert named[0] in ops and named[1].startswith(ops[named[0]] + ")"), msg  # a real node, its real op


@pytest.mark.slow
def test_smollm2_a16w8_on_the_htp_simulator(tmp_path_factory, tmp_path):
    """SmolLM2-135M `--target qnn` (C=256, S=64): every node of both graphs on the HTP with CPU
    fallback disabled; one prefill chunk and one decode step agree with the CPU's Q/DQ emulation.
    (Measured: load 88 s, prefill 72 s, decode ~30-40 s per step on the x86-64 simulator.)"""
    from conftest import smollm2_gguf

    art = tmp_path_factory.mktemp("smollm2-qnn") / "smollm2-qnn-int8"
    p = run_cli("export", str(smollm2_gguf()), "--target", "qnn", "--context", "256", "--chunk", "64",
                "-o", str(art), "-q", timeout=1800)
    assert p.returncode == 0, p.stderr
    dec = on_htp(art, tmp_path)
    for g in ("prefill", "decode"):
        s = json.loads(next((tmp_path / g).rglob("qnn_op_trace.json")).read_text())["summary"]
        assert s["unsupported_nodes"] == 0 and s["supported_nodes"] == s["total_onnx_nodes"] and s["qnn_subgraphs"] == 1
    cpu = edgesdk.load(art, target="cpu")
    ids = cpu.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    a, b = dec.forward(ids), cpu.decoder.forward(ids)
    assert correlation(a, b) > 0.98 and a[-1].argmax() == b[-1].argmax()
    assert cpu.tokenizer.decode([int(a[-1].argmax())]).strip() == "Berlin"
    tok = int(a[-1].argmax())
    x, y = dec.forward([tok]), cpu.decoder.forward([tok])
    assert correlation(x, y) > 0.98 and x[-1].argmax() == y[-1].argmax()
