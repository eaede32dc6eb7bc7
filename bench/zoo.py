"""Model-zoo sweep: fxopt vs plain torch.fx on torchvision + seeded timm models; writes bench/results/zoo.md.

    python bench/zoo.py [--filter SUBSTR] [--update-expected] [--resample]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "zoo"))

import torch  # noqa: E402
import zoo_cases as zc  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filter", default="", help="only models whose name matches this regex")
    parser.add_argument("--update-expected", action="store_true", help="record today's passes in expected_passes.json")
    parser.add_argument("--resample", action="store_true", help="redraw the timm sample into timm_sample.json and stop")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    return parser.parse_args()


def _resample() -> None:
    sample = zc.sample_timm()
    zc.TIMM_SAMPLE.write_text(json.dumps(sample, indent=1) + "\n")
    print(f"wrote {len(sample['models'])} models to {zc.TIMM_SAMPLE}")


def main() -> None:
    args = _parse()
    torch.set_num_threads(2)
    if args.resample:
        _resample()
        return
    cases = [c for c in zc.all_cases() if re.search(args.filter, c.name)]
    results = []
    for i, case in enumerate(cases, 1):
        result = zc.run_case(case)
        results.append(result)
        status = "pass" if result.passed else f"FAIL {result.reason[:120]}"
        print(f"[{i}/{len(cases)}] {case.name:55s} fx={'ok' if result.fx_ok else '--'} "
              f"trace={result.trace:6s} {result.time_s:5.1f}s {status}", flush=True)
    print()
    print(zc.summary_text(results))
    if not args.filter:
        zc.RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
        zc.RESULTS_MD.write_text(zc.render_markdown(results, "python bench/zoo.py"))
        print(f"\nwrote {zc.RESULTS_MD}")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    if args.update_expected:
        expected = zc.load_expected() | {r.name: zc.expected_entry(r) for r in results if r.passed}
        zc.EXPECTED.write_text(json.dumps(dict(sorted(expected.items())), indent=1) + "\n")
        print(f"recorded {len(expected)} expected passes in {zc.EXPECTED}")


if __name__ == "__main__":
    main()
