"""bench/distill.py runs end to end on a tiny budget and says plainly whether distillation helped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("distill_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_writes_the_table_and_a_verdict(tmp_path):
    out = tmp_path / "distill.md"
    _bench_module().main(["--seeds", "1", "--steps", "4", "--width", "4", "--teacher-epochs", "1", "--out", str(out)])
    text = out.read_text()
    assert "| (a) labels only |" in text and "| (c) labels + logit KD + ICKD (kept channels) |" in text
    assert text.count("vs labels only on the mean") == 3


def test_verdict_words():
    bench = _bench_module()
    arms = ["a", "b", "c"]
    rows = [{"a": 0.90, "b": 0.92, "c": 0.88}, {"a": 0.91, "b": 0.93, "c": 0.92}]
    lines = bench.verdict(rows, arms)
    assert lines[0].startswith("- b: helped: +2.00 points") and "better on 2 of 2 seeds" in lines[0]
    assert lines[1].startswith("- c: did not help: -0.50 points") and "better on 1 of 2 seeds" in lines[1]
