"""The benchmark (``benchmarks/bench.py``, importable because pytest puts ``benchmarks/`` on the path):
its table has the expected rows, and its memory probe sees an allocation.

No wall-clock assertions: timings depend on the machine and on whatever else runs on it.
"""

import importlib.util
import sys

import pytest
import torch

from bench import PeakMemory, main

EXPECTED_ROWS = [
    ("forward (full logits)", "ours", "LLaVA"),
    ("forward (full logits)", "ours", "original"),
    ("forward (full logits)", "scratch", "ours"),
    ("greedy generation, 8 tokens", "ours", "LLaVA"),
    ("greedy generation, 8 tokens", "ours", "original"),
    ("greedy generation, 8 tokens", "scratch", "ours"),
    ("4 pictures x 8 tokens", "batched", "sequential"),
    ("chat follow-up turn, 8 tokens", "cached", "original"),
    ("chat follow-up turn, 8 tokens", "cached", "re-encode all"),
    ("chat follow-up, first token", "cached", "original"),
    ("chat follow-up, first token", "cached", "re-encode all"),
    ("projector training step, batch 2", "cached features", "recomputed"),
]


def test_quick_bench_prints_the_expected_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["--sizes", "tiny", "--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny |")]
    cells = [[cell.strip() for cell in row] for row in rows]
    assert [tuple(c[1:4]) for c in cells] == EXPECTED_ROWS
    for c in cells:
        assert float(c[6]) > 0  # a ratio
        assert c[4].endswith(("ms", " s")) and c[5].endswith(("ms", " s"))
        if sys.platform == "linux":
            assert c[9] != "n/a" and c[10] != "n/a"  # peak memory measured


def test_unknown_size_is_refused():
    with pytest.raises(SystemExit):
        main(["--sizes", "huge"])


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_peak_memory_sees_an_allocation():
    with PeakMemory() as memory:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched
        del block
    assert memory.mb is not None and memory.mb >= 48


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python is not installed (make llama-cpp)")
def test_the_llama_cpp_rows(capsys):
    from bench import bench_llama_cpp

    rows = bench_llama_cpp("mini", repeats=1, warmup=1, new_tokens=16, log=lambda *_: None)
    decode = "decode tokens/s (16 tokens)"
    assert [(r.comparison, r.a, r.b) for r in rows] == [("time to the first token", "llama.cpp", "ours"),
                                                        (decode, "llama.cpp", "ours"),
                                                        (decode, "llama.cpp", "ours-scratch"),
                                                        (decode, "ours-scratch", "ours")]
    assert all(r.ratio > 0 and r.time_a > 0 and r.time_b > 0 for r in rows)


def test_the_stage1_row_compares_two_processes_with_one(capsys):
    from bench import bench_stage1

    [row] = bench_stage1(repeats=1, pairs=16, epochs=1, log=lambda line: None)
    assert (row.a, row.b, row.meaning) == ("2 processes", "1 process", "examples/s 2 processes/1")
    assert row.time_a > 0 and row.time_b > 0 and row.ratio == pytest.approx(row.time_b / row.time_a)
