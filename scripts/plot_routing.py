"""Plots TTFT p90 against request rate, one line per routing strategy, from the JSON the
routing_quality bench writes. Usage: plot_routing.py results.json out.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = json.load(open(src))
    strategies = []
    for r in rows:
        if r["strategy"] not in strategies:
            strategies.append(r["strategy"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for s in strategies:
        pts = sorted((r["rate"], r["ttft_p90"]) for r in rows if r["strategy"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    ax.set_xlabel("request rate (requests/s, Poisson)")
    ax.set_ylabel("TTFT p90 (s)")
    ax.set_yscale("log")
    workload = rows[0]["workload"] if rows else ""
    ax.set_title(f"Time to first token, p90 ({workload}, 4 simulated vLLM servers)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
