"""edgesdk export SOURCE [--target T] [--precision P] -o OUT"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export", help="export an HF folder, hub id or .gguf to an ONNX artifact")
    p.add_argument("source", help="HF model folder, hub id (org/name), .gguf file, or pkg:DIST")
    p.add_argument("--target", default="cpu", help="target profile name or .yaml path (default: cpu)")
    p.add_argument("--precision", default=None, help="int4, int8, fp16 or fp32 (default: the target's)")
    p.add_argument("-o", "--output", default=None, help="artifact folder to create")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--context-length", "--context", type=int, default=None,
                   help="cap the model's context (KV cache size); for static targets the fixed context C")
    p.add_argument("--chunk", type=int, default=None,
                   help="static targets (qnn, openvino, coreml): prompt tokens per prefill call (default: the profile's)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="static int8/int4 targets: text to calibrate the activations on (default: a shipped text)")
    p.add_argument("--ep-context", action="store_true", default=None,
                   help="qnn: also compile the graphs into QNN context binaries (EPContext) for fast loading")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="then measure perplexity on FILE and print the delta against an FP32 reference export")
    p.add_argument("--draft", default=None, metavar="DRAFT_SOURCE",
                   help="also export this smaller model (same tokenizer) as a bundled speculative-decoding draft")
    p.add_argument("--draft-precision", default=None, help="the draft's precision (default: the same as the model's)")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="keep only the N most frequent tokens in the lm_head of the draft (with --draft) or of "
                        "this export (then usable only as a draft): a faster draft step")
    p.add_argument("--vocab-text", action="append", default=[], metavar="FILE",
                   help="text to count token frequencies in for --draft-vocab (repeatable; default: token id order)")
    p.add_argument("--draft-keep-precision", action="store_true",
                   help="keep a GGUF draft's 5-8-bit tensors at 8 bits (default: quantized again to 4 bits, "
                        "a cheaper draft step with the same output)")
    p.add_argument("--requantize-gguf", action="store_true",
                   help="quantize a GGUF's weights again with the target's int4 algorithm instead of keeping "
                        "the GGUF's own blocks (faster on CPU, less accurate)")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..exporters import export

    if a.eval_text:
        from ..evaluate import read_text

        read_text(a.eval_text)  # refuse a missing or empty file before a long export
    out = export(a.source, a.target, a.output, precision=a.precision, force=a.force,
                 context_length=a.context_length, quiet=a.quiet, draft=a.draft, draft_precision=a.draft_precision,
                 requantize_gguf=a.requantize_gguf, draft_vocab=a.draft_vocab, vocab_texts=a.vocab_text,
                 draft_keep_precision=a.draft_keep_precision,
                 chunk=a.chunk, calibration=a.calibration, ep_context=a.ep_context)
    print(out)
    if a.eval_text:
        from ..evaluate import export_quality

        print(export_quality(a.source, out, a.eval_text, context_length=a.context_length), flush=True)
    return 0
