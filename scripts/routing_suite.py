"""Summarises a `scripts/routing-quality --suite` run: one table per workload and backend
(every strategy at every load; with --repeat, the mean and the runs' range), then the checks
the built-in default is held to:

* its TTFT p50, TTFT p90 and end-to-end p50 are no worse than round-robin's at every load;
* its TTFT p90 is the lowest of all strategies at every load where any strategy answered every
  request. `affinity` (an oracle that knows each request's group, not a router) and the EPP
  behind the gateway shape without response bodies (`+no-response-body`, the same picker) are
  shown but not compared.

Usage: routing_suite.py results-<workload>[-vllm].json ...   (prints Markdown)
The checks compare means over repeated runs; "no worse" allows nothing. A lowest-p90 check
whose runs overlap the best strategy's runs reads "tie" (within the run-to-run spread)."""
import json
import sys
from statistics import mean

DEFAULT = "epp-builtin"
BASELINE = "round-robin"
COLUMNS = [
    ("TTFT p50", "ttft_p50", 1000),
    ("TTFT p90", "ttft_p90", 1000),
    ("TTFT p99", "ttft_p99", 1000),
    ("ITL p50", "itl_p50", 1000),
    ("E2E p50", "e2e_p50", 1000),
    ("E2E p90", "e2e_p90", 1000),
]


def load_name(r: dict) -> str:
    return f"c{r['concurrency']}" if r.get("concurrency") else f"{r['rate']:g}/s"


def cell(rows: list[dict], key: str, scale: float) -> str:
    xs = [r[key] * scale for r in rows if r.get(key) is not None]
    if not xs:
        return "–"
    if len(xs) == 1 or max(xs) - min(xs) < 0.05 * max(abs(max(xs)), 1e-9):
        return f"{mean(xs):.1f}" if scale != 1 else f"{mean(xs):.3f}"
    return f"{mean(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def label(rows: list[dict]) -> str:
    """workload/backend, and the client when it is not the bench's own."""
    r = rows[0]
    client = r.get("client", "own")
    return f"{r['workload']}/{r.get('backend', 'sim')}" + ("" if client == "own" else f" ({client})")


def table(path: str, rows: list[dict]) -> tuple[list[str], dict]:
    print(f"\n### {label(rows)} (`{path}`)\n")
    print("milliseconds; mean over runs (range when it differs by 5 % or more)\n")
    print("| strategy | load | ok/sent | " + " | ".join(c for c, _, _ in COLUMNS) + " | hit rate | requests per server |")
    print("|---|---|---|" + "---|" * len(COLUMNS) + "---|---|")
    cells: dict[tuple[str, str], list[dict]] = {}
    order: list[str] = []
    loads: list[str] = []
    for r in rows:
        if r["strategy"] not in order:
            order.append(r["strategy"])
        if load_name(r) not in loads:
            loads.append(load_name(r))
        cells.setdefault((r["strategy"], load_name(r)), []).append(r)
    for load in loads:
        for s in order:
            rs = cells.get((s, load))
            if not rs:
                continue
            ok = f"{sum(r['ok'] for r in rs)}/{sum(r['requests'] for r in rs)}"
            hits = " ".join("–" if r.get("hit_rate") is None else f"{100 * r['hit_rate']:.0f} %" for r in rs)
            spread = " ".join(str(r.get("spread", "")) for r in rs)
            row = [s, load, ok] + [cell(rs, k, f) for _, k, f in COLUMNS] + [hits, spread]
            print("| " + " | ".join(row) + " |")
    return loads, cells


def figure(rows: list[dict], key: str) -> float | None:
    """The mean of `key` over runs, None when a run has no figure (nothing answered)."""
    xs = [r.get(key) for r in rows]
    return None if any(x is None for x in xs) else mean(xs)


def compared(strategy: str) -> bool:
    return strategy != "affinity" and not strategy.endswith("+no-response-body")


def checks(label: str, loads: list[str], cells: dict) -> list[str]:
    """The check lines for one table: failures start with 'FAIL'."""
    out = []
    for load in loads:
        ours = cells.get((DEFAULT, load))
        base = cells.get((BASELINE, load))
        if not ours or not base:
            continue
        for name, key in [("TTFT p50", "ttft_p50"), ("TTFT p90", "ttft_p90"), ("E2E p50", "e2e_p50")]:
            a, b = figure(ours, key), figure(base, key)
            if a is None or b is None:
                out.append(f"FAIL {label} {load}: {name} missing")
                continue
            verdict = "ok  " if a <= b else "FAIL"
            out.append(f"{verdict} {label} {load}: {name} {1000 * a:.1f} ms against round-robin's {1000 * b:.1f} ms")
        answered = {
            s: figure(rs, "ttft_p90")
            for (s, l), rs in cells.items()
            if l == load and compared(s) and all(r["ok"] == r["requests"] for r in rs)
        }
        answered = {s: v for s, v in answered.items() if v is not None}
        p90 = figure(ours, "ttft_p90")
        if answered and p90 is not None:
            best = min(answered, key=answered.get)
            if p90 <= answered[best]:
                verdict = "ok  "
            elif min(r["ttft_p90"] for r in ours) <= max(r["ttft_p90"] for r in cells[(best, load)]):
                # Repeated runs whose ranges overlap: within the run-to-run spread.
                verdict = "tie "
            else:
                verdict = "FAIL"
            out.append(
                f"{verdict} {label} {load}: TTFT p90 {1000 * p90:.1f} ms; lowest {best} {1000 * answered[best]:.1f} ms"
            )
    return out


def main(paths: list[str]) -> None:
    lines = []
    for p in paths:
        rows = json.load(open(p))
        if not rows:
            continue
        loads, cells = table(p, rows)
        lines += checks(label(rows), loads, cells)
    print(f"\n### The built-in default (`{DEFAULT}`) against every strategy\n")
    print("```")
    print("\n".join(lines) if lines else f"no run has both {DEFAULT} and {BASELINE}")
    print("```")


if __name__ == "__main__":
    main(sys.argv[1:])
