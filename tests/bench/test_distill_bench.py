"""bench/distill.py runs end to end on a tiny budget, says plainly whether distillation helped, and
replaces only the sections of the results file it re-ran."""

from __future__ import annotations

import torch
from bench_loader import load_bench


def _bench_module():
    return load_bench('distill')


def test_bench_writes_the_tables_and_a_verdict_per_arm_and_regime(tmp_path):
    out = tmp_path / "distill.md"
    out.write_text("<!-- part: camera -->\nkept as it was\n")
    _bench_module().main(["--parts", "main", "why", "--seeds", "1", "--width", "4", "--teacher-epochs", "1",
                          "--step-scale", "0.01", "--out", str(out)])
    text = out.read_text()
    assert "| regime | (a) labels only | (b) + logit KD |" in text and "| 300 steps, all 1348 labels |" in text
    assert "(c) + logit KD + ICKD (stage features, kept channels)" in text
    assert text.count("vs labels only on the mean") == 2 * 3  # two distillation arms in each of three regimes
    assert "## Why: the sweep" in text and "### Temperature" in text and "| ICKD stages, weight 1 (no KD) |" in text
    assert text.index("part: main") < text.index("part: why") < text.index("part: camera")
    assert "kept as it was" in text


def test_partly_labelled_batches_use_only_the_chosen_labels():
    bench = _bench_module()
    x, y = torch.arange(100.0)[:, None], torch.arange(100) % 10
    batches = list(bench.PartlyLabelled(x, y, labelled=6, batch_size=8, seed=0))
    assert len(batches) == 100 // 4  # one pass over every image, 4 at a time beside the labelled ones
    labelled = {float(v) for xb, yb in batches for v, t in zip(xb[:, 0], yb) if t != bench.UNLABELLED}
    assert len(labelled) == 6  # the 6 labelled images are cycled: batches of 4 and 2
    assert [int(yb.ne(bench.UNLABELLED).sum()) for _, yb in batches[:4]] == [4, 2, 4, 2]
    assert all(int(yb.eq(bench.UNLABELLED).sum()) == 4 for _, yb in batches)
    assert len(list(bench.PartlyLabelled(x, y, labelled=None, batch_size=8))) == 13


def test_verdict_words():
    bench = _bench_module()
    arms = ["a", "b", "c"]
    rows = [{"a": 0.90, "b": 0.92, "c": 0.88}, {"a": 0.91, "b": 0.93, "c": 0.92}]
    lines = bench.verdict(rows, arms)
    assert lines[0].startswith("- b: helped: +2.00 points") and "better on 2 of 2 seeds" in lines[0]
    assert lines[1].startswith("- c: did not help: -0.50 points") and "better on 1 of 2 seeds" in lines[1]
    close = bench.verdict_line("d", [0.90, 0.95], [0.91, 0.96])  # +1 point, but the seeds differ by 5
    assert close.startswith("d: helped slightly (less than the seed spread): +1.00 points")
