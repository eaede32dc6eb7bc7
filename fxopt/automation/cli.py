"""``fxopt pipeline``: the cached DAG from the command line (see `fxopt.automation.run`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_pipeline_parser"]

EXAMPLES = """examples:
  fxopt pipeline motionnet --latency-ratio 1.0,0.7,0.5 --precision int8 --out runs/motionnet
  fxopt pipeline camera_multitask --latency-ratio 1.0,0.8 --precision int8,fp16 --train-steps 50 --out runs/cam
Running again into the same --out recomputes only what a change reaches (report.md says which nodes ran)."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers joined by commas, e.g. 1.0,0.7,0.5; got '{text}'") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_pipeline_parser(sub: Any) -> None:
    """Add the ``pipeline`` subcommand to the ``fxopt`` parser's subparsers."""
    p = sub.add_parser("pipeline", help="data -> train -> compress -> fine-tune -> int8 -> lower -> evaluate the "
                       "deployed ONNX -> report, cached (reruns recompute only what changed)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a bundled model with a training recipe (fxopt models)")
    p.add_argument("--out", default="runs/pipeline", help="the run folder (default runs/pipeline)")
    p.add_argument("--latency-ratio", type=_floats, default=(1.0,), help="budgets, e.g. 1.0,0.7,0.5 (default 1.0)")
    p.add_argument("--precision", type=_names, default=("int8",), help="precisions, e.g. int8,fp16 (default int8)")
    p.add_argument("--target", type=_names, default=("xavier",), help="targets, e.g. xavier,orin (default xavier)")
    p.add_argument("--data-seed", type=int, default=0, help="seeds data and training (default 0)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--compress", choices=("prune", "slim"), default="prune", help="how to meet the budget (default prune)")
    p.add_argument("--slim-trials", type=int, default=20, help="Optuna trials with --compress slim (default 20)")
    p.add_argument("--slim-storage", default=None,
                   help="an Optuna storage every worker reaches (sqlite:///studies.db or a .journal path): searches share studies")
    p.add_argument("--finetune-steps", type=int, default=100, help="distillation fine-tune steps (default 100)")
    p.add_argument("--finetune-lr", type=float, default=None, help="its learning rate (default: the recipe's)")
    p.add_argument("--distill", default="kd", help="kd, ickd, mse or none (default kd)")
    p.add_argument("--qat-steps", type=int, default=0, help="int8 by quantisation-aware training for this many steps (default 0: PTQ)")
    p.add_argument("--device", default=None,
                   help="where training, fine-tune and QAT run: cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--calib-batches", type=int, default=8, help="int8 calibration batches (default 8)")
    p.add_argument("--workers", type=int, default=0,
                   help="fan the compression branches out on a local Dask cluster of this many workers (needs fxopt[dask])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pipeline)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from fxopt.automation import PipelineConfigError, run

    client = None
    if args.workers:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise PipelineConfigError("--workers needs dask: pip install 'fxopt[dask]'") from None
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True))
    try:
        result = run(
            args.model, args.out, progress=not args.no_progress, client=client, latency_ratios=args.latency_ratio,
            precisions=args.precision, targets=args.target, data_seed=args.data_seed, train_steps=args.train_steps,
            compress=args.compress, slim_trials=args.slim_trials, slim_storage=args.slim_storage, finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr, distill=None if args.distill == "none" else args.distill,
            calib_batches=args.calib_batches, qat_steps=args.qat_steps, device=args.device)
    finally:
        if client is not None:
            client.close()
    for row in result.rows:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
        print(f"{row['variant']}: {row['latency_ms']:.4f} ms est., {row['onnx_bytes'] / 1024:.1f} KiB; onnx: {metrics}")
    cached = len(result.events) - len(result.ran)
    print(f"nodes: {len(result.ran)} ran, {cached} from the cache; report: {result.report_html} ({result.report_md.name} beside it)")
    return 0
