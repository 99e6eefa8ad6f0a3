"""Plots TTFT p90 and the servers' prefix-cache hit rate against request rate, one line per
routing strategy, from the JSON the routing_quality bench writes; several files of one workload
(runs with different --seed) are averaged. Closed-loop runs (--concurrency) have no rate axis:
they are drawn as bars per strategy (TTFT p50/p90, end-to-end p50, hit rate), averaged over
repeats.
Usage: plot_routing.py results.json [more.json ...] out.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bars(rows: list[dict], dst: str) -> None:
    """One group of bars per strategy, for closed-loop results."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    names = list(by)
    avg = lambda s, k: sum(r[k] for r in by[s]) / len(by[s])  # noqa: E731
    fig, (lat, hits) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120)
    width = 0.27
    xs = range(len(names))
    for i, (key, label) in enumerate(
        [("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"), ("e2e_p50", "end-to-end p50")]
    ):
        lat.bar([x + (i - 1) * width for x in xs], [1000 * avg(s, key) for s in names], width, label=label)
    hits.bar(list(xs), [100 * avg(s, "hit_rate") for s in names], 0.6)
    first = rows[0]
    where = "real vLLM" if first.get("backend") == "vllm" else "simulated vLLM"
    lat.set_title(
        f"{first['workload']}, {len(first['spread'])} {where} servers, {first['concurrency']} in flight"
    )
    lat.set_ylabel("ms")
    lat.legend(fontsize="small")
    hits.set_title("prefix-cache hit rate at the servers")
    hits.set_ylabel("%")
    hits.set_ylim(0, 100)
    for ax in (lat, hits):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst)


def main(srcs: list[str], dst: str) -> None:
    cells: dict[tuple[str, float], list[dict]] = {}
    loaded = [r for src in srcs for r in json.load(open(src))]
    if loaded and all(r.get("concurrency", 0) > 0 for r in loaded):
        bars(loaded, dst)
        return
    rows_src = loaded
    for r in loaded:
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
    servers = len(rows_src[0]["spread"]) if rows_src else 4
    ttft.set_title(f"TTFT p90 ({workload}, {servers} simulated vLLM servers)")
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
