"""Plots the overload bench: the critical objective's TTFT p90 per front end against its
unloaded value (and the 2x line), and what became of every request per front end, class and
tenant (served, or refused by status and reason).
Usage: plot_overload.py overload.json out.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    heads = data["headline"]
    base = data["unloaded_critical_ttft_p90"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})

    modes = [h["mode"] for h in heads]
    left.bar(modes, [h["critical_ttft_p90"] for h in heads], color=["tab:green", "tab:orange", "tab:gray"])
    left.axhline(base, color="black", linestyle=":", label=f"unloaded ({base:.3f} s)")
    left.axhline(2 * base, color="tab:red", linestyle="--", label="2x unloaded")
    left.set_yscale("log")
    left.set_ylabel("critical TTFT p90 (s, log)")
    left.set_title(f"critical objective at {data['rate'] / data['capacity']:.1f}x capacity")
    left.legend(fontsize=8)

    rows = data["classes"]
    short = {"flow-control": "FC", "no-flow-control": "no FC", "round-robin": "RR"}
    labels = [f"{short.get(r['mode'], r['mode'])}\n{r['class'][:4]}. {r['tenant'][-1]}" for r in rows]
    outcomes = ["served"] + sorted({k for r in rows for k in r["refused"]})
    names = {"429 -": "429, no reason (shed without flow control)"}
    colors = {"served": "tab:green"}
    palette = ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, o in enumerate(outcomes[1:]):
        colors[o] = palette[i % len(palette)]
    bottom = [0] * len(rows)
    for o in outcomes:
        vals = [r["served"] if o == "served" else r["refused"].get(o, 0) for r in rows]
        right.bar(range(len(rows)), vals, bottom=bottom, label=names.get(o, o), color=colors[o])
        bottom = [b + v for b, v in zip(bottom, vals)]
    right.set_xticks(range(len(rows)))
    right.set_xticklabels(labels, fontsize=8)
    right.set_ylabel("requests")
    right.set_title("every request: served, or refused (status, x-llm-d-request-dropped-reason)")
    right.set_ylim(0, max(bottom) * 1.3)  # room for the legend above the bars
    right.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
