"""Plots TTFT p90 and the servers' prefix-cache hit rate against request rate, one line per
routing strategy, from the JSON the routing_quality bench writes; several files of one workload
(runs with different --seed) are averaged.
Usage: plot_routing.py results.json [more.json ...] out.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(srcs: list[str], dst: str) -> None:
    cells: dict[tuple[str, float], list[dict]] = {}
    for src in srcs:
        for r in json.load(open(src)):
            cells.setdefault((r["strategy"], r["rate"]), []).append(r)
    rows = [
        {
            "strategy": s,
            "rate": rate,
            "workload": rs[0]["workload"],
            "ttft_p90": sum(r["ttft_p90"] for r in rs) / len(rs),
            "hit_rate": sum(r["hit_rate"] for r in rs) / len(rs),
        }
        for (s, rate), rs in cells.items()
    ]
    strategies = []
    for r in rows:
        if r["strategy"] not in strategies:
            strategies.append(r["strategy"])
    fig, (ttft, hits) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for s in strategies:
        pts = sorted((r["rate"], r["ttft_p90"], r["hit_rate"]) for r in rows if r["strategy"] == s)
        rates = [p[0] for p in pts]
        ttft.plot(rates, [p[1] for p in pts], marker="o", label=s)
        hits.plot(rates, [100 * p[2] for p in pts], marker="o", label=s)
    workload = rows[0]["workload"] if rows else ""
    ttft.set_title(f"TTFT p90 ({workload}, 4 simulated vLLM servers)")
    ttft.set_ylabel("seconds (log)")
    ttft.set_yscale("log")
    hits.set_title("prefix-cache hit rate at the servers")
    hits.set_ylabel("%")
    hits.set_ylim(0, 100)
    for ax in (ttft, hits):
        ax.set_xlabel("request rate (requests/s, Poisson)")
        ax.grid(True, which="both", alpha=0.3)
    hits.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
