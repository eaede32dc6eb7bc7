"""bench/slim.py runs end to end on a tiny budget and judges the issue's goal from the rows it wrote."""

from __future__ import annotations

from bench_loader import load_bench

LAT = "est. xavier latency ms (int8)"


def _row(arm: str, latency: float, miou: float) -> dict:
    return {"model": "camera_multitask:md", "arm": arm, LAT: latency, "seg_miou": miou}


def _rows(slim_at_half: float) -> list[dict]:
    return [_row("fp32 (trained)", 2.0, 0.90), _row("slim: after fine-tune", 1.06, 0.895),
            _row("uniform prune: after fine-tune", 1.06, 0.897), _row("no compression: after fine-tune", 2.0, 0.91),
            _row("slim at 0.5: after fine-tune", 0.98, slim_at_half)]


def test_goal_is_judged_on_the_slim_arm_at_half_latency():
    bench = load_bench("slim")
    met = bench.verdicts(_rows(0.885))
    assert any("goal (<= 0.5x the fp32 estimate within 2 points) MET: slim at 0.5 at 0.49x, seg_miou -1.5 points" in v for v in met)
    missed = bench.verdicts(_rows(0.87))
    assert any("goal" in v and "missed: slim at 0.5 at 0.49x, seg_miou -3.0 points" in v for v in missed)
    # at one latency uniform pruning scored higher at seed 0
    assert any("at one latency, slim at 0.53x" in v and "slim not better at fine-tune seed 0" in v for v in met)
    # no arm at <= 0.5: the goal is missed on the lowest one, whatever its metric
    assert any("missed: slim at 0.53x, seg_miou -0.5 points" in v for v in bench.verdicts(_rows(0.885)[:4]))


def test_goal_is_not_judged_on_a_model_that_learnt_nothing():
    bench = load_bench("slim")
    rows = _rows(0.885)
    assert any("MET" in v for v in bench.verdicts(rows, chance={"camera_multitask:md": 0.5}))
    # a trained model at chance loses nothing whatever is cut: no MET, no missed
    judged = bench.verdicts(rows, chance={"camera_multitask:md": 0.90})
    assert not any("MET" in v or "missed" in v for v in judged)
    assert any("goal NOT JUDGED: the trained model's seg_miou 0.9000 is not above chance (0.9000)" in v for v in judged)


def test_seed_spread_verdict_needs_the_worst_seed_to_beat_the_best():
    bench = load_bench("slim")
    spread = [{"model": "m", "arm": "slim", "metric": "x", "seed 0": 0.8, "seed 1": 0.9, "mean": 0.85, "min": 0.8, "max": 0.9},
              {"model": "m", "arm": "uniform prune", "metric": "x", "seed 0": 0.7, "seed 1": 0.85, "mean": 0.775, "min": 0.7, "max": 0.85}]
    assert "slim not shown different (the seeds overlap)" in bench.verdicts([], spread)[0]
    spread[1].update({"max": 0.79})
    assert bench.verdicts([], spread)[0].endswith("slim better")


def test_bench_runs_a_preset_end_to_end_on_a_tiny_budget(tmp_path):
    out = tmp_path / "slim.md"
    load_bench("slim").main(["--models", "camera_multitask", "--train-steps", "3", "--trials", "3", "--steps", "2",
                             "--seeds", "2", "--calib", "2", "--finetune-top", "1", "--no-hd", "--out", str(out),
                             "--space", "depth", "width", "layers", "--keep-at-chance"])
    text = out.read_text()
    assert "--train-steps 3 --no-hd --space depth width layers --keep-at-chance` (`make bench-slim`)" in text
    for arm in ("fp32 (trained)", "slim: after fine-tune", "uniform prune: after int8", "no compression: after fine-tune"):
        assert f"| camera_multitask | {arm} |" in text
    assert "| camera_multitask | slim | seg_miou |" in text  # the seed-spread table
    # three training steps leave it at chance: the arms run (--keep-at-chance), the goal is not judged
    assert "camera_multitask: goal NOT JUDGED: the trained model's seg_miou" in text
    assert "camera_multitask: at one latency, slim at" not in text  # nor compared at one latency
