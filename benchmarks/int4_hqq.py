"""Experiment (issue 5): an INT4 artifact made by onnxruntime.quantization's HQQ from an FP32 export.

    python benchmarks/int4_hqq.py build/smol-fp32 build/smol-int4-hqq [--block-size 32]
                                  [--exclude /lm_head/MatMul]

Why: SmolLM2 reaches edgesdk as a Q4_1 GGUF (every MatMul weight Q4_1, block 32, asymmetric with
a float minimum; token_embd/lm_head Q8_0). The builder's INT4 (RTN or k_quant, integer zero
points) re-quantizes that 4-bit grid onto another one and loses ~40% perplexity. HQQ's zero points
are floats, so a Q4_1 block (scale d, minimum m) is representable exactly: HQQ starts from
min/max, which for a block using its full 0..15 range is exactly Q4_1's (d, -m/d).

Copies the FP32 artifact, quantizes its MatMuls to MatMulNBits (4 bits, asymmetric, accuracy
level 4) with HQQ, and writes a fresh manifest (precision int4, the recipe under
"quantization"). Needs torch (edgesdk[export]); takes ~5 minutes for 135M parameters on 2 cores.

Measured (docs/bench-eval.md): +0.02% perplexity over FP32 with --exclude /lm_head/MatMul, but
onnxruntime 1.31's CPU MatMulNBits runs float zero points on a slow path: decode is 10-16x
slower than the builder's INT4. A measurement of where quality goes, not a shippable recipe.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgesdk import artifact

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32")
    ap.add_argument("out")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--exclude", default="", help="comma-separated MatMul node names to keep in FP32")
    a = ap.parse_args(argv)
    src, out = Path(a.fp32), Path(a.out)
    manifest = artifact.read(src).manifest
    if manifest.get("precision") != "fp32":
        raise SystemExit(f"{src} is {manifest.get('precision')}, not an FP32 export")
    exclude = [n for n in a.exclude.split(",") if n]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model_file = manifest["model"]["filename"]
    for f in src.iterdir():
        if not f.name.startswith(model_file) and f.name != artifact.MANIFEST:
            shutil.copy(f, out / f.name)
    t0 = time.time()
    q = MatMulNBitsQuantizer(onnx.load(str(src / model_file)), bits=4, block_size=a.block_size, is_symmetric=False,
                             accuracy_level=4, nodes_to_exclude=exclude,
                             algo_config=HQQWeightOnlyQuantConfig(block_size=a.block_size, bits=4))
    q.process()
    onnx.save_model(q.model.model, str(out / model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{model_file}.data", size_threshold=1024)
    manifest["precision"] = "int4"
    manifest["quantization"] = {"algorithm": "hqq", "block_size": a.block_size, "accuracy_level": 4,
                                "symmetric": False, "tool": "onnxruntime.quantization.MatMulNBitsQuantizer",
                                **({"excluded": exclude} if exclude else {})}
    ops: dict[str, int] = {}
    for n in q.model.model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    manifest["model"]["op_types"] = ops
    artifact.write_manifest(out, manifest)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.0f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
