"""NAS-slimming vs uniform latency pruning on the bundled perception models, then int8 on top.

    python bench/slim.py [--models camera_multitask pointpillars camera_multitask:md] [--trials 30] [--seeds 3] [--train-seed 0]

A model is a registry name, or ``name:preset`` for a preset with its own recipe (`fxopt.models.recipe`):
``camera_multitask:md`` is the 192x320 mid-sized camera network, whose Xavier estimate is dominated by
compute, where the default configs are dominated by per-inference and per-kernel overheads.

For each model: train it with its recipe (`fxopt.models.train`, seed `--train-seed`, 0 by default), then compile it for
`xavier` twice with the same fine-tune and int8 on top (`precision="int8"`, calibrated on recipe
batches). The fine-tune is what a user gets from the recipe: ``distill="kd"`` (the recipe's own
output distillation from the trained model) at compile's default ``finetune_lr`` (the recipe's
``finetune_lr``) for the recipe's ``finetune_steps``; ``--steps`` / ``--lr`` override them:

- **slim**: ``passes=[Slim(trials=..), "quantize"]`` at ``latency_ratio=0.5`` of the int8 estimate (the
  compile precision), or, where slim's space or uniform pruning cannot reach it, the nearest ratio both reach
  (so the two arms are compared at one latency);
- **uniform prune**: ``passes=[PruneChannels(by="latency", amount=a), "quantize"]`` with `a` chosen
  so the estimated int8 latency matches what slim reached;
- **no compression**: ``passes=["quantize"]`` with the same fine-tune: what fine-tuning alone does;
- **slim at its lowest reachable ratio**, when that is below what uniform pruning reaches.

Each arm is compiled again with fine-tune seeds 1..`--seeds`-1 (the same architecture; only the
fine-tune's batches and initial state of its generators change), and a second table gives the
primary metric at every seed: slim counts as better than uniform pruning only when its worst seed
beats uniform's best.

The rows come from each compile's summary table (estimated Xavier latency at fp16 and int8,
params, FLOPs, the recipe's held-out metrics at each step, in torch: the int8 row runs the
fake-quantised graph). Results go to bench/results/slim.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fxopt
from fxopt.costs.cost_model import estimate_costs
from fxopt.output.files import write_atomic
from fxopt.passes import PruneChannels, Slim
from fxopt.passes.slim import DIMENSIONS, OPT_IN_DIMENSIONS, WIDTH_CHOICES, latency_range

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_version  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "slim.md"
SUMMARY = "summary: input model and after each step"
PRECISION = "int8"  # the compile precision: slim's budget and the latency comparisons are at it
LATENCY = f"est. xavier latency ms ({PRECISION})"
# the metric the 2-point goal is judged on, per model
PRIMARY = {"camera_multitask": "seg_miou", "pointpillars": "mAP"}
MODELS = ("camera_multitask", "pointpillars", "camera_multitask:md")
# also runnable, not in the default run: pointpillars:md needs ``--space depth width resolution layers``
# to reach 0.5x and takes about as long as the default run (bench/results/slim_pointpillars_md.md)
CHOICES = (*MODELS, "pointpillars:md")


def _split(key: str) -> tuple[str, dict[str, Any]]:
    """``"name:preset"`` -> ``("name", {"preset": "preset"})``; a bare name has the default config."""
    name, _, preset = key.partition(":")
    return name, ({"preset": preset} if preset else {})


def _metric(key: str) -> str:
    return PRIMARY[_split(key)[0]]


def _recipe(key: str) -> Any:
    name, cfg = _split(key)
    return fxopt.models.recipe(name, **cfg)


def _finetune_steps(key: str, args: argparse.Namespace) -> int:
    """``--steps``, else the recipe's ``finetune_steps``."""
    return args.steps if args.steps is not None else _recipe(key).finetune_steps


def _calib(recipe: Any, n: int) -> list[tuple[Any, ...]]:
    g = torch.Generator().manual_seed(12345)
    return [tuple(recipe.batch(i, g)[0]) for i in range(n)]


def _compile(model: torch.nn.Module, key: str, first: Any, args: argparse.Namespace, calib: list[Any], **extra: Any) -> tuple[Any, float]:
    name, cfg = _split(key)
    start = time.perf_counter()
    compiled = fxopt.compile(
        model, "xavier", example_inputs=fxopt.models.example_inputs(name, **cfg), passes=[*([first] if first else []), "quantize"],
        precision="int8", calib_data=calib, recipe=fxopt.models.recipe(name, **cfg), finetune_steps=_finetune_steps(key, args),
        finetune_lr=args.lr, distill="kd", export=False, progress=args.progress, **extra,
    )
    return compiled, time.perf_counter() - start


def _slim(args: argparse.Namespace, **options: Any) -> Slim:
    """The run's Slim pass (its trials and space; search seed 0)."""
    return Slim(trials=args.trials, seed=0, space=args.space, width_choices=args.widths, **options)


def _rows(model: str, arm: str, compiled: Any, seconds: float) -> list[dict[str, Any]]:
    out = []
    for row in compiled.report.tables[SUMMARY]:
        stage = row["stage"]
        if stage == "input model" and arm != "slim":
            continue  # one fp32 row per model
        out.append({"model": model, "arm": "fp32 (trained)" if stage == "input model" else f"{arm}: {stage}", **{
            k: v for k, v in row.items() if k != "stage"}, "compile s": round(seconds, 1)})
    return out


def _uniform_reach(model: torch.nn.Module, key: str, ratio: float, calib: list[Any]) -> float:
    """The estimated int8 latency ratio `PruneChannels(by="latency")` reaches when asked for `ratio`
    (no fine-tune: a probe of how far an even cut of this model goes)."""
    name, cfg = _split(key)
    compiled = fxopt.compile(model, "xavier", example_inputs=fxopt.models.example_inputs(name, **cfg), precision=PRECISION,
                             passes=[PruneChannels(amount=1 - ratio, by="latency"), "quantize"], calib_data=calib, export=False)
    table = compiled.report.tables[SUMMARY]
    return table[1][LATENCY] / table[0][LATENCY]


def run_model(key: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]], float]:
    """Rows, notes and the seed-spread rows of one model, and its recipe's chance level of the primary metric."""
    name, cfg = _split(key)
    torch.manual_seed(args.train_seed)
    start = time.perf_counter()
    trained = fxopt.models.train(name, args.train_steps, seed=args.train_seed, progress=args.progress, **cfg)
    train_s = time.perf_counter() - start
    metric = _metric(key)
    trained_to = ", ".join(f"{k} {v:.3f}" for k, v in trained.metrics.items())
    if not trained.metrics[metric] > trained.chance[metric] and not args.keep_at_chance:  # nothing learnt, nothing to lose
        return [], [f"{key}: NOT RUN: trained {train_s:.0f} s to {trained_to}; {metric} is not above the recipe's chance "
                    f"level {trained.chance[metric]:.4f}, so there is nothing to compress"], [], trained.chance[metric]
    calib = _calib(fxopt.models.recipe(name, **cfg), args.calib)
    example = fxopt.models.example_inputs(name, **cfg)
    name = key  # rows, notes and compiles below name the model with its preset
    floor_s, base_s = latency_range(fxopt.trace(trained.model, example), example, "xavier", PRECISION, space=args.space,
                                    width_choices=args.widths)
    uniform_floor = _uniform_reach(trained.model, name, args.ratio, calib)
    # the comparison is at one latency both arms reach: the requested ratio, else the nearer of
    # slim's floor (plus a margin for the search) and what uniform pruning reaches when asked for it.
    # Slim alone runs at the requested ratio whenever its floor is within it: the search's first
    # trial is the smallest candidate, so a feasible one always exists
    reaches = floor_s / base_s <= args.ratio
    if reaches:
        ratio = args.ratio if uniform_floor <= args.ratio else math.ceil(uniform_floor * 100) / 100
    else:
        ratio = round(max(floor_s / base_s + 0.05, uniform_floor), 2)
    why = []
    if not reaches:
        removed = "every residual block and removable layer" if "layers" in args.space else "every residual block"
        why.append(f"the smallest slim candidate ({removed} removed, every stage at width {min(args.widths):g}) is estimated at "
                   f"{floor_s * 1e3:.3f} ms = {floor_s / base_s:.2f}x the trained model's {base_s * 1e3:.3f} ms ({PRECISION}; "
                   "fixed per-inference and per-kernel costs of a small model)")
    if uniform_floor > args.ratio:
        why.append(f"PruneChannels(by=\"latency\") asked for {args.ratio} reaches {uniform_floor:.2f}x")
    notes = [] if ratio == args.ratio else [
        f"{name}: latency_ratio {args.ratio} is out of reach for a comparison at one latency: " + "; ".join(why)
        + f"; both arms ran at latency_ratio {ratio}"]
    slim, slim_s = _compile(trained.model, name, _slim(args, progress=args.progress, finetune_top=args.finetune_top), args, calib,
                            latency_ratio=ratio)
    if next(r for r in slim.report.passes if r.name == "slim").status != "applied":
        raise RuntimeError(f"{name}: slim did not apply: {next(r for r in slim.report.passes if r.name == 'slim').reason}")
    table = slim.report.tables[SUMMARY]
    reached = table[1][LATENCY] / table[0][LATENCY]
    uniform, uniform_s = _compile(trained.model, name, PruneChannels(amount=1 - reached, by="latency"), args, calib)
    tuned, tuned_s = _compile(trained.model, name, None, args, calib)  # the same fine-tune, nothing removed
    rows = (_rows(name, "slim", slim, slim_s) + _rows(name, "uniform prune", uniform, uniform_s)
            + _rows(name, "no compression", tuned, tuned_s))
    lowest = args.ratio if reaches else round(floor_s / base_s + 0.05, 2)
    # slim alone goes further (removing blocks, narrower widths): how much does that cost? Always run
    # where slim reaches the requested ratio and the comparison ran above it: the goal is judged there
    deeper_arm = lowest < ratio - 0.02 or (reaches and ratio > args.ratio)
    if deeper_arm:
        deeper, deeper_s = _compile(trained.model, name, _slim(args, progress=args.progress, finetune_top=args.finetune_top), args, calib,
                                    latency_ratio=lowest)
        rows += [r for r in _rows(name, f"slim at {lowest}", deeper, deeper_s) if not r["arm"].startswith("fp32")]
        notes.append(f"{name}: slim at latency_ratio {lowest} (below what uniform pruning reaches) chose "
                     + "; ".join(f"{r['dimension']}: {r['choice']}" for r in deeper.report.tables["slim: chosen architecture"]))
    chosen = [f"{r['dimension']}: {r['choice']}" for r in slim.report.tables["slim: chosen architecture"]]
    notes += [f"{name}: trained {train_s:.0f} s to {trained_to} (chance: {metric} {trained.chance[metric]:.4f})",
              f"{name}: slim chose " + "; ".join(chosen)]
    # the same arms again with other fine-tune seeds (slim's search stays seed 0, so the architecture
    # is the same): how much of a difference between arms is the fine-tune's luck
    arms = {"slim": (lambda: _slim(args, finetune_top=args.finetune_top), {"latency_ratio": ratio}),
            "uniform prune": (lambda: PruneChannels(amount=1 - reached, by="latency"), {}),
            "no compression": (lambda: None, {})}
    if deeper_arm:
        arms[f"slim at {lowest}"] = (lambda: _slim(args, finetune_top=args.finetune_top), {"latency_ratio": lowest})
    spread = []
    for arm, (first, extra) in arms.items():
        values = [next(r[metric] for r in rows if r["arm"] == f"{arm}: after fine-tune")]
        for seed in range(1, args.seeds):
            compiled, _ = _compile(trained.model, name, first(), args, calib, finetune_seed=seed, **extra)
            values.append(next(r[metric] for r in compiled.report.tables[SUMMARY] if r["stage"] == "after fine-tune"))
        spread.append({"model": name, "arm": arm, "metric": metric, **{f"seed {i}": round(v, 4) for i, v in enumerate(values)},
                       "mean": round(statistics.mean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)})
    return rows, notes, spread, trained.chance[metric]


def run_hd(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """camera_multitask's deployment-sized preset (384x640), untrained (its recipe takes about 5 s a
    step on a 2-core CPU): Slim at `--ratio` on its recipe's HD scenes, latency and proxy only."""
    torch.manual_seed(0)
    model = fxopt.models.create("camera_multitask", preset="hd").eval()
    example = fxopt.models.example_inputs("camera_multitask", preset="hd")
    g = torch.Generator().manual_seed(12345)
    hd_batch = fxopt.models.recipe("camera_multitask", preset="hd").batch
    calib = [(hd_batch(i, g)[0][0][:2],) for i in range(args.calib)]
    start = time.perf_counter()
    compiled = fxopt.compile(model, "xavier", example_inputs=example, passes=[_slim(args, progress=args.progress)],
                             latency_ratio=args.ratio, calib_data=calib, export=False)
    seconds = time.perf_counter() - start
    rows = []
    for stage, gm in (("fp32 (untrained)", fxopt.trace(model, example)), (f"slim at latency_ratio {args.ratio}", compiled.graph_module)):
        row: dict[str, Any] = {"model": "camera_multitask hd", "arm": stage}
        for p in ("fp16", "int8"):
            row[f"est. xavier latency ms ({p})"] = round(estimate_costs(gm, "xavier", p).latency_s * 1e3, 4)
        cost = estimate_costs(gm, "xavier", "fp16")
        row.update({"params": cost.params, "FLOPs": cost.flops, "compile s": round(seconds, 1) if gm is compiled.graph_module else ""})
        rows.append(row)
    chosen = compiled.report.tables.get("slim: chosen architecture", [])
    notes = ["camera_multitask hd (384x640, untrained: no metric; its recipe is too slow for this CPU): slim chose "
             + "; ".join(f"{r['dimension']}: {r['choice']}" for r in chosen)]
    return rows, notes


def _make_target(out: Path) -> str:
    """` (`make TARGET`)` where a Makefile target writes `out`, else nothing."""
    target = {"slim.md": "bench-slim", "slim_pointpillars_md.md": "bench-slim-pointpillars-md"}.get(Path(out).name)
    return f" (`make {target}`)" if target else ""


def _settings(args: argparse.Namespace) -> str:
    """The fine-tune's steps and rate, as the run chose them."""
    steps = f"{args.steps} Adam steps" if args.steps is not None else "the recipe's finetune_steps (" + ", ".join(
        f"{key}: {_finetune_steps(key, args)}" for key in args.models) + ")"
    lr = f"lr {args.lr:g}" if args.lr is not None else "compile's default finetune_lr (the recipe's: " + ", ".join(
        f"{key}: {_recipe(key).finetune_lr:g}" for key in args.models) + ")"
    return f"{steps} at {lr}"


def _markdown(rows: list[dict[str, Any]], notes: list[str], args: argparse.Namespace, total_s: float,
              spread: list[dict[str, Any]] = ()) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [
        "# NAS-slimming vs uniform latency pruning (then int8) on the bundled perception models", "",
        f"Generated by `python bench/slim.py --models {' '.join(args.models)} --trials {args.trials}"
        f"{'' if args.steps is None else f' --steps {args.steps}'}{'' if args.lr is None else f' --lr {args.lr:g}'} "
        f"--ratio {args.ratio} --finetune-top {args.finetune_top} --calib {args.calib} --threads {args.threads} --seeds {args.seeds}"
        f"{'' if args.train_steps is None else f' --train-steps {args.train_steps}'}{'' if args.hd else ' --no-hd'}"
        f"{'' if args.train_seed == 0 else f' --train-seed {args.train_seed}'}"
        f"{'' if tuple(args.space) == DIMENSIONS else ' --space ' + ' '.join(args.space)}"
        f"{'' if tuple(args.widths) == WIDTH_CHOICES else ' --widths ' + ' '.join(f'{w:g}' for w in args.widths)}"
        f"{' --keep-at-chance' if args.keep_at_chance else ''}`{_make_target(args.out)} at fxopt {code_version()}, torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} thread(s); whole run {total_s:.0f} s.", "",
        f"Each model is trained with its recipe (seed {args.train_seed}); both arms get the same fine-tune (recipe loss + `distill=\"kd\"`, the "
        f"recipe's output distillation from the trained model, {_settings(args)}) and int8 on top. Latencies are "
        "fxopt's Xavier estimates (not device measurements); metrics are the recipe's held-out metrics in torch.", "",
        "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    if spread:
        skeys = list(dict.fromkeys(k for r in spread for k in r))
        lines += ["", f"Fine-tune seeds: the metric after the same fine-tune with finetune_seed 0..{args.seeds - 1} "
                  "(the architecture of each arm is the same at every seed).", "",
                  "| " + " | ".join(skeys) + " |", "|" + "---|" * len(skeys)]
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in skeys) + " |" for r in spread]
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], spread: list[dict[str, Any]] = (), goal_ratio: float = 0.5,
             chance: dict[str, float] | None = None) -> list[str]:
    """The issue's goal per model: slim within 2 points of fp32 at <= 50% of its latency, and
    better than uniform pruning at the same latency (over the fine-tune seeds: better only when
    slim's worst seed beats uniform's best).

    `chance` is each model's chance level of its primary metric: a trained model not above it has
    learnt nothing to lose, so its goal is not judged."""
    out = []
    models = list(dict.fromkeys([r["model"] for r in rows] + [r["model"] for r in spread]))
    for model in models:
        arms = {r["arm"]: r for r in spread if r["model"] == model}
        if "slim" in arms and "uniform prune" in arms and len([k for k in arms["slim"] if k.startswith("seed ")]) > 1:
            a, b = arms["slim"], arms["uniform prune"]
            verdict = "better" if a["min"] > b["max"] else "worse" if a["max"] < b["min"] else "not shown different (the seeds overlap)"
            seeds = len([k for k in a if k.startswith("seed ")])
            out.append(f"{model}, over {seeds} fine-tune seeds at one latency: slim {a['metric']} mean {a['mean']:.4f} "
                       f"[{a['min']:.4f}, {a['max']:.4f}], uniform pruning {b['mean']:.4f} [{b['min']:.4f}, {b['max']:.4f}]: slim {verdict}")
    lat = LATENCY
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        if not mine or _split(model)[0] not in PRIMARY:
            continue
        metric = _metric(model)
        fp32 = next(r for r in mine if r["arm"].startswith("fp32"))
        slim = next(r for r in mine if r["arm"] == "slim: after fine-tune")
        uni = next(r for r in mine if r["arm"] == "uniform prune: after fine-tune")
        ref = next(r for r in mine if r["arm"] == "no compression: after fine-tune")
        ratio = slim[lat] / fp32[lat]  # at the compile precision
        slims = [r for r in mine if r["arm"].startswith("slim") and r["arm"].endswith(": after fine-tune")]
        for low in (r for r in slims if r is not slim):
            out.append(f"{model}: {low['arm'].split(':')[0]} (uniform pruning cannot reach it) at {low[lat] / fp32[lat]:.2f}x: "
                       f"{metric} {100 * (low[metric] - fp32[metric]):+.1f} points vs fp32")
        # the goal: some slim arm at <= goal_ratio of the fp32 estimate within 2 points of its metric
        meeting = [r for r in slims if r[lat] / fp32[lat] <= goal_ratio + 1e-9]
        best = max(meeting, key=lambda r: r[metric]) if meeting else min(slims, key=lambda r: r[lat])
        drop = 100 * (fp32[metric] - best[metric])
        met = bool(meeting) and drop <= 2
        level = (chance or {}).get(model)
        if level is not None and fp32[metric] <= level:
            out.append(f"{model}: goal NOT JUDGED: the trained model's {metric} {fp32[metric]:.4f} is not above chance "
                       f"({level:.4f}), so 'within 2 points of fp32' says nothing (slim's best arm at <= {goal_ratio}x: "
                       f"{metric} {best[metric]:.4f})")
            continue
        out.append(f"{model}: goal (<= {goal_ratio}x the fp32 estimate within 2 points) {'MET' if met else 'missed'}: "
                   f"{best['arm'].split(':')[0]} at {best[lat] / fp32[lat]:.2f}x, {metric} {-drop:+.1f} points vs fp32")
        out.append(f"{model}: at one latency, slim at {ratio:.2f}x: {metric} {100 * (slim[metric] - fp32[metric]):+.1f} points "
                   f"vs fp32; uniform pruning at {uni[lat] / fp32[lat]:.2f}x: {metric} {100 * (uni[metric] - fp32[metric]):+.1f} "
                   f"points (slim {'better' if slim[metric] > uni[metric] else 'not better'} at fine-tune seed 0); the uncompressed "
                   f"model after the same fine-tune: {metric} {100 * (ref[metric] - fp32[metric]):+.1f} points vs fp32 (the recipe's "
                   "model is not trained to convergence, so fine-tuning alone moves the metric)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(CHOICES))
    parser.add_argument("--space", nargs="+", default=list(DIMENSIONS), choices=list(DIMENSIONS + OPT_IN_DIMENSIONS),
                        help="Slim(space=) for every model of the run")
    parser.add_argument("--widths", nargs="+", type=float, default=list(WIDTH_CHOICES),
                        help="Slim(width_choices=): the keep ratios a stage may take")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: the recipe's finetune_steps)")
    parser.add_argument("--lr", type=float, default=None, help="finetune_lr (default: compile's, the recipe's finetune_lr)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=6)
    parser.add_argument("--finetune-top", type=int, default=3, help="Slim(finetune_top=): re-rank the best few after a short fine-tune (the compile's own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=None, help="training steps of each model (default: its recipe's)")
    parser.add_argument("--train-seed", type=int, default=0, help="seed of each model's training (the goal on unseen seeds)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tune seeds per arm (the table shows seed 0; the spread table all)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--keep-at-chance", action="store_true",
                        help="run the arms even for a model trained to no better than chance (smoke runs; its goal is not judged)")
    parser.add_argument("--no-hd", dest="hd", action="store_false", help="leave out the deployment-sized camera preset")
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, notes, spread, chance = [], [], [], {}
    for name in args.models:
        r, n, sp, chance[name] = run_model(name, args)
        rows += r
        notes += n
        spread += sp
    if args.hd:
        r, n = run_hd(args)
        rows += r
        notes += n
    notes += verdicts(rows, spread, args.ratio, chance)
    text = _markdown(rows, notes, args, time.perf_counter() - start, spread)
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
