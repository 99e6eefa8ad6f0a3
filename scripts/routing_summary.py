"""Merges routing_quality result files of the same workload (runs with different --seed) into
one Markdown table: per strategy and rate, TTFT p50/p90/p99 and the servers' prefix-cache hit
rate, each the mean over the runs, with the runs' range for TTFT p90 and hit rate.
Usage: routing_summary.py results-<workload>.json [results-<workload>-seed7.json ...]"""
import json
import sys
from statistics import mean


def main(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    strategies: list[str] = []
    cells: dict[tuple[str, float], list[dict]] = {}
    for rows in runs:
        for r in rows:
            if r["strategy"] not in strategies:
                strategies.append(r["strategy"])
            cells.setdefault((r["strategy"], r["rate"]), []).append(r)
    rates = sorted({rate for (_, rate) in cells})
    print(f"{len(runs)} run(s): mean (range)\n")
    print("| strategy | rate | TTFT p50 | TTFT p90 | TTFT p99 | hit rate |")
    print("|---|---|---|---|---|---|")
    for rate in rates:
        for s in strategies:
            rs = cells.get((s, rate))
            if not rs:
                continue
            p90 = [r["ttft_p90"] for r in rs]
            hit = [100 * r["hit_rate"] for r in rs]
            rng = lambda xs, f: f"({f.format(min(xs))}–{f.format(max(xs))})" if len(xs) > 1 else ""
            print(
                f"| {s} | {rate:g} | {mean(r['ttft_p50'] for r in rs):.3f} "
                f"| {mean(p90):.3f} {rng(p90, '{:.2f}')} | {mean(r['ttft_p99'] for r in rs):.3f} "
                f"| {mean(hit):.1f} % {rng(hit, '{:.0f}')} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
