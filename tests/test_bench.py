"""`edgesdk bench` on a tiny model, as a subprocess, and its bad inputs."""
from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    art = tiny.export("llama", "int4")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    p = run_cli("bench", str(art), "--prompt-tokens", "8,200", "--new-tokens", "5", "--runs", "2", "--warmup", "1",
                "--threads", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    return p.stdout, json.loads(out.read_text()), p.stderr


def test_bench_table_and_json(report):
    table, r, _ = report
    assert r["precision"] == "int4" and r["execution_provider"] == "CPUExecutionProvider"
    assert r["threads"] == 1 and r["runs"] == 2 and r["warmup"] == 1 and r["new_tokens"] == 5
    assert r["max_length"] == 256  # the tiny model's context
    sysinfo = r["system"]
    assert sysinfo["cpu"] and sysinfo["os"] and sysinfo["logical_cores"] >= 1
    assert {"edgesdk", "onnxruntime", "numpy", "tokenizers"} <= set(sysinfo["packages"])

    load = r["load"]["load_s"]
    assert len(load["samples"]) == 2 and 0 < load["min"] <= load["median"] <= load["max"] < 60
    assert r["load"]["peak_rss_bytes"]["median"] > 20 << 20

    assert [e["prompt_tokens"] for e in r["results"]] == [8, 200]  # exactly the lengths asked for
    for e in r["results"]:
        assert e["generated_tokens"]["samples"] == [5, 5]  # EOS is ignored: every run makes new_tokens
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
            s = e[key]
            assert len(s["samples"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"], key
        for prefill, ttft in zip(e["prefill_tok_s"]["samples"], e["ttft_s"]["samples"]):
            assert prefill == pytest.approx(e["prompt_tokens"] / ttft, rel=1e-6)  # per run, not noisy medians
        assert e["peak_rss_scope"] == "run"
    # prefill computes the last position's logits only (num_logits_to_keep): a 200-token prompt no
    # longer materializes [200, 49152] float32 logits (39 MB) that an 8-token one does not
    short, long = (e["peak_rss_bytes"]["median"] for e in r["results"])
    assert long - short < 25 << 20

    assert "CPUExecutionProvider" in table and "threads 1" in table
    for head in ("TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MiB"):
        assert head in table
    rows = [line.split() for line in table.splitlines() if line.strip().split(" ")[0] in ("8", "200")]
    assert [row[:2] for row in rows] == [["8", "5"], ["200", "5"]]


def test_bench_says_which_measurement_it_is_on_when_piped(report):
    """Piped (not a terminal), each measurement still gets a staged line on stderr, in order."""
    *_, err = report
    lines = [line for line in err.splitlines() if line.startswith("==> ")]
    assert lines == ["==> load 1/3 (warm-up)", "==> load 2/3", "==> load 3/3",
                     "==> prompt 8 tokens: 1 warm-up + 2 runs of 5 new tokens",
                     "==> prompt 200 tokens: 1 warm-up + 2 runs of 5 new tokens"], err
    assert "\r" not in err


def test_bench_json_to_stdout(tiny):
    p = run_cli("bench", str(tiny.export("llama", "fp32")), "--prompt-tokens", "4", "--new-tokens", "2",
                "--runs", "1", "--warmup", "0", "--json", "-")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["precision"] == "fp32" and len(r["results"]) == 1 and r["results"][0]["prompt_tokens"] == 4


def test_bench_bad_inputs(tiny, tmp_path):
    art = str(tiny.export("llama", "int4"))
    assert_one_line_error(run_cli("bench", art, "--runs", "0"), "--runs 0")
    assert_one_line_error(run_cli("bench", art, "--warmup", "-1"), "--warmup -1")
    assert_one_line_error(run_cli("bench", art, "--new-tokens", "0"), "--new-tokens 0")
    assert_one_line_error(run_cli("bench", art, "--prompt-tokens", "0,8"), "--prompt-tokens")
    assert_one_line_error(run_cli("bench", art), "2048-token prompt plus 128 new tokens", "holds 256")
    assert_one_line_error(run_cli("bench", art, "--prompt-tokens", "64", "--max-length", "32"), "--max-length holds 32")
    assert_one_line_error(run_cli("bench", str(tmp_path / "missing")), "no artifact at")
    assert_one_line_error(run_cli("bench", art, "--prompt-tokens", "8", "--json", str(tmp_path / "no" / "x.json")),
                          "folder does not exist")
    p = run_cli("bench", art, "--prompt-tokens", "eight")
    assert p.returncode == 2 and "comma-separated" in p.stderr
