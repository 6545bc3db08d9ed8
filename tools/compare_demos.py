"""Two `make demo` outputs side by side: the same test split and the same report figures?

    python tools/compare_demos.py runs/demo /other/clone/runs/demo [--tolerance=1e-6]

Compares the index's split of every series (series.csv), the dataset manifest, and every
number of pretrain/report.json (and liver/*/results.json when both have them). Prints one
line per difference and a verdict; exit status 1 when they differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys


def _splits(demo: str) -> dict[str, str]:
    with open(os.path.join(demo, "index", "series.csv"), newline="") as f:
        return {r["series_key"]: r["split"] for r in csv.DictReader(f)}


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{prefix}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix, float(tree)


def compare_json(a: str, b: str, tolerance: float, skip=("meta",)) -> list[str]:
    with open(a) as f:
        left = json.load(f)
    with open(b) as f:
        right = json.load(f)
    for key in skip:
        left.pop(key, None)
        right.pop(key, None)
    x, y = dict(_numbers(left)), dict(_numbers(right))
    problems = [f"{a}: {k} only on one side" for k in sorted(set(x) ^ set(y))]
    for k in sorted(set(x) & set(y)):
        if not (math.isclose(x[k], y[k], abs_tol=tolerance) or (math.isnan(x[k]) and math.isnan(y[k]))):
            problems.append(f"{os.path.basename(a)} {k}: {x[k]!r} vs {y[k]!r}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    problems = []
    sa, sb = _splits(args.a), _splits(args.b)
    test_a = sorted(k for k, s in sa.items() if s == "test")
    test_b = sorted(k for k, s in sb.items() if s == "test")
    print(f"test split: {len(test_a)} vs {len(test_b)} series, "
          f"{'identical' if test_a == test_b else 'DIFFERENT'}")
    if sa != sb:
        problems.append(f"series.csv splits differ for {sum(sa.get(k) != sb.get(k) for k in set(sa) | set(sb))} series")
    reports = [("pretrain/report.json",)] + [
        (os.path.join("liver", d, "results.json"),) for d in sorted(os.listdir(os.path.join(args.a, "liver")))
        if os.path.exists(os.path.join(args.a, "liver", d, "results.json"))
    ] if os.path.isdir(os.path.join(args.a, "liver")) else [("pretrain/report.json",)]
    for (rel,) in reports:
        a, b = os.path.join(args.a, rel), os.path.join(args.b, rel)
        if not os.path.exists(b):
            problems.append(f"{rel} missing in {args.b}")
            continue
        found = compare_json(a, b, args.tolerance)
        print(f"{rel}: {'same' if not found else f'{len(found)} numbers differ'} "
              f"(tolerance {args.tolerance:g})")
        problems += found
    for p in problems[:50]:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
