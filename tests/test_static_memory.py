"""What keeps an NPU export small in memory, checked for exactness against the paths it replaces:

- a GGUF's float source graph is written tensor by tensor from its blocks (gguf_stream.export_float),
  and the static pair made from it is the one made through transformers' dequantized model;
- the pair's weights are quantized before calibration (static_qdq), and onnxruntime's quantizer
  makes from them the graph it makes from the float weights with the same per-channel scales.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgesdk
from conftest import NO_EXPORT_CACHE
from edgesdk import exporters
from edgesdk.exporters import gguf_stream, hf_stream, static, static_qdq

gguf = pytest.importorskip("gguf")


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _same_pair(a, b) -> None:
    """Two static pairs with the same graphs and bit-identical weights and host tables."""
    for g in static.GRAPHS:
        ma, mb = onnx.load(str(a / f"{g}.onnx")), onnx.load(str(b / f"{g}.onnx"))
        assert [(n.op_type, list(n.input)) for n in ma.graph.node] == [(n.op_type, list(n.input)) for n in mb.graph.node]
        wa, wb = initializers(a / f"{g}.onnx"), initializers(b / f"{g}.onnx")
        assert wa.keys() == wb.keys()
        assert sum(v.size >= 64 * 64 for v in wa.values()) >= 2 * 5 + 1  # both layers' q|k|v, o, gate, up, down; lm_head
        for k in wa:
            np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    np.testing.assert_array_equal(np.load(a / static.EMBED), np.load(b / static.EMBED))
    # RoPE tables: the builder computes them in both paths alike (they do not come from the
    # weights); two builder runs in one process have differed by up to 1.5e-4 past position 128
    # (2 of ~30 runs of this test), so they are compared to 1e-3
    ra, rb = np.load(a / static.ROPE), np.load(b / static.ROPE)
    assert ra.files == rb.files
    for k in ra.files:
        np.testing.assert_allclose(ra[k], rb[k], rtol=0, atol=1e-3, err_msg=k)


@pytest.mark.parametrize("source", ["gguf-llama", "gguf-qwen2", "hf-llama", "hf-qwen2"])
def test_static_source_graph_is_streamed_and_equals_the_transformers_path(source, tiny, tmp_path, monkeypatch):
    """A GGUF's blocks / an HF folder's safetensors become the float graph weight by weight, with
    transformers never loading the model, and the static pair is the one the float32 transformers
    model gives."""
    from test_gguf_stream import write_tiny_gguf

    for k, v in NO_EXPORT_CACHE.items():
        monkeypatch.setenv(k, v)
    kind, arch = source.split("-")
    if kind == "gguf":
        path = tmp_path / f"tiny-{arch}.gguf"
        write_tiny_gguf(path, arch=arch)
    else:
        path = tiny.model(arch)
    module = gguf_stream if kind == "gguf" else hf_stream
    streamed_from = []

    def no_transformers(*a, **k):
        raise AssertionError("the model was loaded through transformers")

    with monkeypatch.context() as m:
        m.setattr(gguf_stream, "_CHUNK_ROWS", 100)  # the embedding and lm_head dequantized in row slices
        m.setattr(exporters.sources, "prepare", lambda src, work: src.hf_dir or no_transformers())
        m.setattr(exporters.builder, "build", no_transformers)
        real = module.export_float
        m.setattr(module, "export_float", lambda *a: streamed_from.append(a[0]) or real(*a))
        streamed = edgesdk.export(path, "openvino", tmp_path / "streamed", precision="fp32", context_length=64,
                                  chunk=16, quiet=True)
    assert [s.path for s in streamed_from] == [path]
    with monkeypatch.context() as m:
        m.setattr(exporters, "_stream_float", lambda *a: None)
        loaded = edgesdk.export(path, "openvino", tmp_path / "loaded", precision="fp32", context_length=64,
                                chunk=16, quiet=True)
    _same_pair(streamed, loaded)


def _gemm_pair(folder, rng) -> dict[str, np.ndarray]:
    """A prefill/decode pair of x -> Reshape -> Gemm(W1^T) -> Gemm(W2^T, bias) -> Reshape -> Mul
    (transB=1), as static.matmuls_to_gemm writes them, with the weights in an external file.
    W2^T [96, 64] is the widest: the lm_head. Returns the weights."""
    w = {"w1.T": (rng.standard_normal((64, 64)) * 0.05).astype(np.float32),
         "w2.T": (rng.standard_normal((96, 64)) * 0.05).astype(np.float32)}
    w["w2.T"][3] *= 40  # one wide row: per-channel scales differ
    bias = (rng.standard_normal(96) * 0.1).astype(np.float32)
    for name in static.GRAPHS:
        nodes = [helper.make_node("Reshape", ["x", "s2"], ["x2d"], name="to2d"),
                 helper.make_node("Gemm", ["x2d", "w1.T"], ["h2d"], name="gemm1", transB=1),
                 helper.make_node("Gemm", ["h2d", "w2.T", "b"], ["y2d"], name="gemm2", transB=1),
                 helper.make_node("Reshape", ["y2d", "s3"], ["y3d"], name="to3d"),
                 helper.make_node("Mul", ["y3d", "y3d"], ["y"], name="square")]
        inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [
            numpy_helper.from_array(bias, "b"), numpy_helper.from_array(np.array([4, 64], np.int64), "s2"),
            numpy_helper.from_array(np.array([1, 4, 96], np.int64), "s3")]
        g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 96])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m = onnx.shape_inference.infer_shapes(m)
        onnx.save_model(m, str(folder / f"{name}.onnx"), save_as_external_data=True, location="w.data",
                        size_threshold=1024)
    return w


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_prequantized_weights_quantize_as_the_float_weights_would(bits, tmp_path):
    """quantize_static over the pre-quantized pair gives, byte for byte, the graph it gives from
    the float weights with those per-channel scales as overrides (the path the export took before)."""
    import ml_dtypes
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    src, pre = tmp_path / "float", tmp_path / "pre"
    src.mkdir()
    pre.mkdir()
    w = _gemm_pair(src, np.random.default_rng(0))
    static_qdq.prequantize_family(src, pre, bits)
    stored = initializers(pre / "decode.onnx")
    assert "w1.T" not in stored and "w2.T" not in stored  # the float weights are gone
    qmax = {"w1.T": 127 if bits == "int8" else 7, "w2.T": 127}  # the lm_head stays 8-bit
    for name, qm in qmax.items():
        codes, scale = stored[f"{name}_quantized"], stored[f"{name}_scale"]
        assert codes.dtype == (np.int8 if qm == 127 else ml_dtypes.int4) and scale.shape == (w[name].shape[0],)
        codes = codes.astype(np.float32)
        assert np.abs(codes).max() == qm
        assert np.abs(codes * scale[:, None] - w[name]).max() <= 0.5 * scale.max() * (1 + 1e-5)

    ranges = {"x": (-3.0, 3.0), "x2d": (-3.0, 3.0), "h2d": (-2.0, 2.5), "y2d": (-9.0, 11.0), "y3d": (-9.0, 11.0),
              "y": (0.0, 121.0)}
    cache = tmp_path / "ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {k: (np.float32(lo), np.float32(hi))
                                                             for k, (lo, hi) in ranges.items()}), cache)
    static.quantize_graph(pre / "decode.onnx", tmp_path / "new.onnx", static.qdq_config(pre / "decode.onnx", bits, {}),
                          cache)
    # the float path: the same scales given to the quantizer as overrides
    overrides = {}
    for name, qm in qmax.items():
        qtype = QuantType.QInt8 if qm == 127 else QuantType.QInt4
        overrides[name] = [{"quant_type": qtype, "axis": 0, "scale": np.float32(s), "zero_point": 0}
                           for s in np.maximum(np.abs(w[name]).max(axis=1), 1e-8).astype(np.float32) / qm]
    cfg = get_qnn_qdq_config(str(src / "decode.onnx"), None, activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QInt8 if bits == "int8" else QuantType.QInt4, per_channel=True,
                             init_overrides=overrides, calibration_providers=["CPUExecutionProvider"])
    cfg.use_external_data_format = True
    static.quantize_graph(src / "decode.onnx", tmp_path / "old.onnx", cfg, cache)
    new, old = initializers(tmp_path / "new.onnx"), initializers(tmp_path / "old.onnx")
    assert new.keys() == old.keys() and "b_quantized" in new  # the bias too, int32 at input x weight scale
    for k in new:
        np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    a, b = onnx.load(str(tmp_path / "new.onnx")), onnx.load(str(tmp_path / "old.onnx"))
    assert sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in a.graph.node) == \
        sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in b.graph.node)
