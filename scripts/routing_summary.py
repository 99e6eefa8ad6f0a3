"""Merges routing_quality result files of the same workload (runs with different --seed) into
one Markdown table: per strategy and rate, TTFT p50/p90/p99, the servers' prefix-cache hit rate
and how often a group moved server, each the mean over the runs, with the runs' range for TTFT p90 and hit rate.
Usage: routing_summary.py results-<workload>.json [results-<workload>-seed7.json ...]"""
import json
import sys
from statistics import mean


def moved(rs: list[dict]) -> str:
    """The mean share of requests moved away from their group's previous server (older
    result files lack it)."""
    xs = [r["moved"] for r in rs if "moved" in r]
    return f"{100 * mean(xs):.0f} %" if xs else "–"


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
    print("| strategy | rate | TTFT p50 | TTFT p90 | TTFT p99 | hit rate | moved |")
    print("|---|---|---|---|---|---|---|")
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
                f"| {mean(hit):.1f} % {rng(hit, '{:.0f}')} "
                f"| {moved(rs)} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
