"""bench/qat_ptq.py: the goal's check, the fresh held-out set and the rendered table, on made-up figures
(fast; the benchmark itself trains every model three times)."""

from __future__ import annotations

import importlib

from bench_loader import load_bench


def _bench_module():
    return load_bench("qat_ptq")


def _metrics(fp32: float, ptq: float, qat: float) -> dict[str, dict[str, float]]:
    return {"fp32": {"mAP": fp32}, "PTQ": {"mAP": ptq}, "QAT": {"mAP": qat}}


def test_goal_needs_qat_at_least_ptq_and_near_fp32_only_where_ptq_is_not():
    bench = _bench_module()
    assert bench.Check.of(_metrics(0.50, 0.499, 0.499), "mAP").holds  # PTQ within 0.5 point: QAT only >= PTQ
    assert not bench.Check.of(_metrics(0.50, 0.499, 0.498), "mAP").holds  # QAT below PTQ
    assert bench.Check.of(_metrics(0.50, 0.48, 0.496), "mAP").holds  # PTQ 2 points down, QAT within 0.5
    miss = bench.Check.of(_metrics(0.50, 0.48, 0.49), "mAP")
    assert not miss.holds and miss.why_not() == "PTQ -2.00 and QAT -1.00 vs fp32"


def test_fresh_eval_set_is_another_draw_of_the_recipe_generator():
    bench = _bench_module()
    module = importlib.import_module("fxopt.models.motionnet")
    seed = bench.fresh_seed("motionnet")
    assert seed not in (module.EVAL_SEED, module.VALIDATION_SEED)
    held, fresh = module.eval_set().occupancy, module.eval_set(seed).occupancy
    assert fresh.shape == held.shape and not (fresh == held).all()


def test_render_reports_both_sets_the_median_and_where_the_goal_fails():
    bench = _bench_module()
    results = [
        bench.SeedResult("pointpillars", seed, _metrics(0.50, 0.48, qat), _metrics(0.50, 0.48, fresh),
                         qat_notes=["QAT: lr 0.0005 (given)"], seconds={"train": 1.0})
        for seed, qat, fresh in ((0, 0.499, 0.47), (1, 0.497, 0.49), (2, 0.50, 0.49))
    ]
    text = bench.render(results, "python bench/qat_ptq.py", 60.0, {"pointpillars": (None, 150)}, "xavier")
    assert "- On the recipe's held-out set (the pipeline's evaluate node): the goal holds at 3 of 3 model-seed pairs." in text
    assert "- On the fresh held-out set: the goal holds at 0 of 3 model-seed pairs; it does not at pointpillars seed 0 " \
           "(mAP: QAT -1.00 vs PTQ; PTQ -2.00 and QAT -3.00 vs fp32)" in text
    assert "| **median** | QAT | 0.4990 | -0.10 |" in text
    assert "| pointpillars | 0 | QAT: lr 0.0005 (given) |" in text
