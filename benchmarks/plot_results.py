"""Plot the committed benchmark tables: minidiff / diffusers time and peak-memory ratios per row (below 1: minidiff wins).

    python benchmarks/plot_results.py [benchmarks/RESULTS.json] [-o ratios.png]

From a notebook: `import sys; sys.path.insert(0, '../benchmarks'); from plot_results import plot_results;
plot_results('../benchmarks/RESULTS.json')`. Needs only matplotlib and the JSON that bench_suite.py writes.
"""
import json, sys
from pathlib import Path

DEFAULT = Path(__file__).parent/"RESULTS.json"

def ratios(path=DEFAULT):
    "[(label, time ratio, peak-memory ratio, (min, max) over the pairs)] for every row both libraries completed."
    res = json.loads(Path(path).read_text())
    out = []
    for r in res["rows"].values():
        d, m = r["diffusers"], r["minidiff"]
        if d.get("status") != "ok" or m.get("status") != "ok": continue
        k = "image_s" if "image_s" in d else "time_s"
        out.append((r["label"], m[k] / d[k], m["peak_mb"] / d["peak_mb"],
                    (min(r["pair_ratios"]), max(r["pair_ratios"])) if r["pair_ratios"] else None))
    return out

def plot_results(path=DEFAULT, ax=None):
    "Horizontal bars of minidiff / diffusers (time and peak memory) per row, a line at 1; returns the axes."
    import matplotlib.pyplot as plt
    rs = ratios(path)
    if ax is None: _, ax = plt.subplots(figsize=(8, 0.45 * len(rs) + 1.2))
    ys = range(len(rs))
    t = ax.barh([y + 0.2 for y in ys], [r[1] for r in rs], height=0.4, label="time")
    ax.barh([y - 0.2 for y in ys], [r[2] for r in rs], height=0.4, label="peak memory")
    for y, r in zip(ys, rs):                              # the spread of the interleaved pairs' time ratios
        if r[3]: ax.plot(r[3], [y + 0.2] * 2, color="black", lw=1)
    ax.axvline(1, color="gray", ls="--"); ax.set_yticks(list(ys)); ax.set_yticklabels([r[0] for r in rs])
    ax.invert_yaxis(); ax.set_xlabel("minidiff / diffusers (below 1: minidiff faster / leaner)"); ax.legend()
    return ax

if __name__ == "__main__":
    import matplotlib; matplotlib.use("Agg")
    args = [a for a in sys.argv[1:] if a != "-o"]
    out = sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else "benchmark_ratios.png"
    src = next((a for a in args if a.endswith(".json")), DEFAULT)
    plot_results(src).figure.savefig(out, bbox_inches="tight", dpi=120); print(out)
