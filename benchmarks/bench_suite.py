"""The benchmark suite: minidiff against diffusers on the same weights, every measurement in a fresh process.

    python benchmarks/bench_suite.py [--quick] [--device cpu|cuda] [--rows ROW ...] [--repeats N] [--out FILE.md]

Full-size SD v1.5 configs (nbs/configs/runwayml_stable-diffusion-v1-5) with seeded random weights are saved once to a
temporary folder by diffusers/transformers and loaded by both libraries; the small pipeline is `save_tiny_sd`'s folder.
Each row runs `--repeats` pairs of child processes, interleaved A B B A A B ... so that the machine's noise (other jobs,
thermal drift) hits both libraries alike; times and memory are the medians over the processes, and every pair also
gives its own minidiff / diffusers ratio (the table shows their median and range). Memory is the peak of the whole
process (CPU: VmHWM, the resident high-water mark; CUDA: torch.cuda.max_memory_allocated) and the extra memory of the
timed calls alone. Compiled rows use `torch.compile(module, fullgraph=True)` on the UNet, the VAE decoder and the text
encoder; their first call (the compile) is reported apart from the steady-state time. Each library gets its own
inductor cache for the run, so the first process of a compiled row compiles cold and the later ones hit the cache.

`--device cuda` runs in float16 and synchronises before every clock read; this path has not been run on a GPU yet.
Results are merged into FILE.json next to FILE.md (rows measured again replace the old ones) and FILE.md is
rewritten from the JSON; `benchmarks/plot_results.py` plots that JSON. `--profile ROW` prints, for both libraries,
the ops where the time goes (torch.profiler) instead of timing.
"""
import argparse, datetime, json, os, platform, statistics, subprocess, sys, tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
REAL = ROOT/"nbs"/"configs"/"runwayml_stable-diffusion-v1-5"
LIBS = ("minidiff", "diffusers")

# name: (group, label, spec). `steps` in a "pipe" spec is the number of steps measured; the row reports 25 steps,
# measured when steps == 25 and otherwise extrapolated as (time outside the steps) + 25 x (median time of one step).
ROWS = {
    "text": ("parts", "text encoding, 2 x 77 tokens", dict(kind="text", batch=2, inner=20)),
    "unet_b1": ("parts", "UNet step, batch 1", dict(kind="unet", batch=1, inner=2)),
    "unet_b2": ("parts", "UNet step, batch 2 (CFG)", dict(kind="unet", batch=2, inner=2)),
    "unet_b2_sliced": ("parts", "UNet step, batch 2, attention slicing 'auto'",
                       dict(kind="unet", batch=2, inner=2, sliced=True)),
    "vae": ("parts", "VAE decode 512²", dict(kind="vae", batch=1, inner=2)),
    "unet_b2_channels_last": ("parts", "UNet step, batch 2, channels_last",
                              dict(kind="unet", batch=2, inner=2, channels_last=True)),
    "vae_channels_last": ("parts", "VAE decode 512², channels_last", dict(kind="vae", batch=1, inner=2,
                                                                        channels_last=True)),
    "vae_1024": ("parts", "VAE decode 1024²", dict(kind="vae", batch=1, res=1024)),
    "vae_1024_tiled": ("parts", "VAE decode 1024², tiled", dict(kind="vae", batch=1, res=1024, tiled=True)),
    "image_b1": ("image", "512² image, 25 UniPC steps, batch 1", dict(kind="pipe", batch=1, steps=25, warm_steps=2)),
    "image_b1_sliced": ("image", "512² image, 25 steps, batch 1, attention slicing",
                        dict(kind="pipe", batch=1, steps=25, warm_steps=2, sliced=True)),
    "image_b8": ("image", "512² image, 25 steps, batch 8", dict(kind="pipe", batch=8, steps=2, warm_steps=1)),
    "image_b8_sliced": ("image", "512² image, 25 steps, batch 8, attention slicing",
                        dict(kind="pipe", batch=8, steps=2, warm_steps=1, sliced=True)),
    "text_compiled": ("compiled", "text encoding, compiled", dict(kind="text", batch=2, inner=20, compiled=True)),
    "unet_b2_compiled": ("compiled", "UNet step, batch 2, compiled", dict(kind="unet", batch=2, inner=2,
                                                                         compiled=True)),
    "vae_compiled": ("compiled", "VAE decode 512², decoder compiled", dict(kind="vae", batch=1, inner=2,
                                                                          compiled=True)),
    "image_b1_compiled": ("compiled", "512² image, 25 steps, batch 1, compiled",
                          dict(kind="pipe", batch=1, steps=25, warm_steps=2, compiled=True)),
    "image_b8_compiled": ("compiled", "512² image, 25 steps, batch 8, compiled",
                          dict(kind="pipe", batch=8, steps=2, warm_steps=1, compiled=True)),
    "small": ("small", "small pipeline, 25 UniPC steps, 64², batch 2",
              dict(kind="pipe", tiny=True, batch=2, res=64, steps=25, inner=5)),
    "small_compiled": ("small", "small pipeline, compiled", dict(kind="pipe", tiny=True, batch=2, res=64, steps=25,
                                                                 inner=5, compiled=True)),
    "small_compiled_unet_vae": ("small", "small pipeline, UNet + VAE decoder compiled, text encoder eager",
                                dict(kind="pipe", tiny=True, batch=2, res=64, steps=25, inner=5, compiled=True,
                                     compile_text=False)),
}
DEFAULT = [r for r in ROWS if not r.startswith("vae_1024")]
GROUPS = dict(parts="SD v1.5 parts (full-size configs)", image="Whole images (full-size SD v1.5, UniPC, guidance 7.5)",
              compiled="Compiled (torch.compile fullgraph=True) against compiled", small="The small pipeline")

def sh(cmd):
    try: return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError: return ""

def machine(device):
    import torch, diffusers, transformers
    model = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")), "")
    info = dict(cpu=model or platform.processor(), cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                commit=sh(f"git -C {ROOT} rev-parse --short HEAD"), nice=os.nice(0), device=device)
    if device == "cuda": info["gpu"] = torch.cuda.get_device_name()
    return info

def load(): return os.getloadavg()

def save_full_size(folder):
    "SD v1.5's layout at full size: the real configs, seeded random weights, the tokenizer and scheduler of save_tiny_sd."
    import torch, diffusers, transformers
    from minidiff import save_tiny_sd
    save_tiny_sd(folder)                                        # tokenizer, scheduler, model_index; parts replaced below
    for i, (part, cls) in enumerate((("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL))):
        torch.manual_seed(i)
        cls.from_config(json.loads((REAL/part/"config.json").read_text())).save_pretrained(f"{folder}/{part}")
    torch.manual_seed(2)
    cfg = transformers.CLIPTextConfig(**json.loads((REAL/"text_encoder"/"config.json").read_text()))
    transformers.CLIPTextModel(cfg).save_pretrained(f"{folder}/text_encoder")

def child(spec, threads, env_extra):
    "Run one measurement in a fresh interpreter; return its JSON (or an error record)."
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **env_extra}
    p = subprocess.run([sys.executable, str(HERE/"_suite_child.py"), json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"exit {p.returncode}: {tail[:300]}")
    return json.loads(lines[-1])

def median(xs): return statistics.median(xs) if xs else None

def summarise(runs, spec):
    "Medians over the processes of one library for one row (None where a run failed)."
    ok = [r for r in runs if "time_s" in r]
    if not ok: return dict(status=(runs[0].get("na") or runs[0].get("error", "?")) if runs else "not run")
    s = dict(status="ok", n=len(ok), time_s=median([r["time_s"] for r in ok]),
             peak_mb=median([r["peak_mb"] for r in ok]), extra_mb=median([r["extra_mb"] for r in ok]),
             finite=all(r["finite"] for r in ok))
    if spec.get("compiled"):
        s["compile_cold_s"] = ok[0]["compile_s"]
        s["compile_warm_s"] = median([r["compile_s"] for r in ok[1:]])
    if "layout_max_diff" in ok[0]: s["layout_max_diff"] = max(r["layout_max_diff"] for r in ok)
    if spec["kind"] == "pipe" and ok[0].get("per_step_s") is not None:
        s["per_step_s"] = median([r["per_step_s"] for r in ok])
        s["image_s"] = (s["time_s"] if spec["steps"] == 25 else
                        median([r["fixed_s"] + 25 * r["per_step_s"] for r in ok]))
    return s

def run_row(name, a, folders, threads, caches):
    group, label, spec = ROWS[name]
    spec = dict(spec, device=a.device, folder=str(folders["tiny" if spec.get("tiny") or a.quick else "full"]))
    if a.quick:       # every code path on the small folder: 64² images, 3 steps, one process each
        spec.update(res=64, inner=1, **({"steps": 3, "warm_steps": 1} if spec["kind"] == "pipe" else {}))
    runs, pairs = {l: [] for l in LIBS}, []
    load0 = load()
    for r in range(a.repeats):
        order = LIBS if r % 2 == 0 else LIBS[::-1]               # A B, B A, A B, ...
        got = {l: child(dict(spec, lib=l), threads, {"TORCHINDUCTOR_CACHE_DIR": caches[l]}) for l in order}
        for l in LIBS: runs[l].append(got[l])
        if all("time_s" in got[l] for l in LIBS): pairs.append(got["minidiff"]["time_s"] / got["diffusers"]["time_s"])
        print(f"  {name} #{r}: " + ", ".join(f"{l} {got[l].get('time_s', got[l].get('na') or got[l].get('error'))}"
                                                 for l in order), flush=True)
        if any("time_s" not in got[l] for l in LIBS) and r == 0: break        # n/a or failing: do not repeat
    return dict(group=group, label=label, spec=spec, runs=runs, pair_ratios=pairs, load_start=load0, load_end=load(),
                command=" ".join(["python benchmarks/bench_suite.py", *sys.argv[1:]]),
                **{l: summarise(runs[l], spec) for l in LIBS})

def profile_row(name, a, folders, threads):
    "Where the time goes in one row, for both libraries (torch.profiler, ops sorted by self time)."
    _, label, spec = ROWS[name]
    spec = dict(spec, device=a.device, profile=True, inner=1, warm_steps=1,
                folder=str(folders["tiny" if spec.get("tiny") or a.quick else "full"]))
    if spec["kind"] == "pipe" and not spec.get("tiny"): spec["steps"] = 2
    out = {l: child(dict(spec, lib=l), threads, {}) for l in LIBS}
    for l in LIBS:
        r = out[l]
        print(f"\n### {l}: {label}: {r.get('time_s', r)} s, {r.get('top_ops')} top-level ops, "
              f"{r.get('kernel_s')} s in them\n\n| op | calls | self s | total s |\n|---|---|---|---|")
        for e in r.get("profile") or []:
            print(f"| {e['name']} | {e['calls']} | {e['self_s']:.3f} | {e['total_s']:.3f} |")
    return out

# ---------------------------------------------------------------- the report
def fmt(x, nd=2): return "—" if x is None else f"{x:.{nd}f}"

def verdict(ratio, ok_below=1.0):
    return "—" if ratio is None else ("✔" if ratio <= ok_below else ("≈ (within 5 %)" if ratio <= ok_below * 1.05
                                                                     else "✘"))

def row_table(rows, names):
    out = ["| row | diffusers s | minidiff s | time m/d (pairs: range) | diffusers peak MB | minidiff peak MB | "
           "peak m/d | extra MB d / m | time | memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = rows[n]; d, m = r["diffusers"], r["minidiff"]
        if d["status"] != "ok" or m["status"] != "ok":
            bad = m["status"] if m["status"] != "ok" else d["status"]
            out.append(f"| {r['label']} | {bad} |" + " |" * 8); continue
        key = "image_s" if "image_s" in d else "time_s"
        tr, pr = m[key] / d[key], m["peak_mb"] / d["peak_mb"]
        rng = f" ({min(r['pair_ratios']):.2f}–{max(r['pair_ratios']):.2f})" if len(r["pair_ratios"]) > 1 else ""
        label = r["label"]
        if r["spec"]["kind"] == "pipe" and r["spec"]["steps"] != 25:
            label += f" *(extrapolated from {r['spec']['steps']} steps)*"
        out.append(f"| {label} | {fmt(d[key])} | {fmt(m[key])} | **{tr:.2f}**{rng} | {d['peak_mb']:.0f} | "
                   f"{m['peak_mb']:.0f} | **{pr:.2f}** | {d['extra_mb']:.0f} / {m['extra_mb']:.0f} | {verdict(tr)} | "
                   f"{verdict(pr)} |")
    return "\n".join(out)

def compile_table(rows, names):
    out = ["| row | diffusers compile s (cold / cached) | minidiff compile s (cold / cached) |", "|---|---|---|"]
    for n in names:
        r = rows[n]; d, m = r["diffusers"], r["minidiff"]
        if "compile_cold_s" in d or "compile_cold_s" in m:
            out.append(f"| {r['label']} | {fmt(d.get('compile_cold_s'), 1)} / {fmt(d.get('compile_warm_s'), 1)} | "
                       f"{fmt(m.get('compile_cold_s'), 1)} / {fmt(m.get('compile_warm_s'), 1)} |")
    return "\n".join(out)

def layout_table(rows):
    "channels_last against the same row in the default layout: each library's time ratio and how far its output moves."
    out = ["| row | diffusers: channels_last / default time | minidiff: channels_last / default time | "
           "max difference from the default layout d / m |", "|---|---|---|---|"]
    for n, r in rows.items():
        base = rows.get(n.replace("_channels_last", ""))
        if not r["spec"].get("channels_last") or not base: continue
        cell = lambda l: (fmt(r[l]["time_s"] / base[l]["time_s"]) if r[l]["status"] == base[l]["status"] == "ok"
                          else "—")
        diff = " / ".join(f"{r[l].get('layout_max_diff', float('nan')):.1e}" for l in LIBS[::-1])
        out.append(f"| {r['label']} | {cell('diffusers')} | {cell('minidiff')} | {diff} |")
    return "\n".join(out) if len(out) > 2 else ""

def targets(rows):
    "The issue's targets, each with its figure and verdict."
    out = []
    timed = [n for n, r in rows.items() if r["minidiff"]["status"] == "ok" and r["diffusers"]["status"] == "ok"]
    key = lambda s: s.get("image_s", s["time_s"])
    slower = [f"{rows[n]['label']} ({key(rows[n]['minidiff']) / key(rows[n]['diffusers']):.2f})" for n in timed
              if key(rows[n]["minidiff"]) > key(rows[n]["diffusers"])]
    more = [f"{rows[n]['label']} ({rows[n]['minidiff']['peak_mb'] / rows[n]['diffusers']['peak_mb']:.2f})"
            for n in timed if rows[n]["minidiff"]["peak_mb"] > rows[n]["diffusers"]["peak_mb"]]
    out.append(f"- no slower than diffusers anywhere: {'✔' if not slower else '✘ slower in ' + '; '.join(slower)}")
    out.append(f"- no more memory than diffusers anywhere: {'✔' if not more else '✘ more in ' + '; '.join(more)}")
    s, c = rows.get("small"), rows.get("small_compiled")
    if not (c and c["minidiff"]["status"] == "ok") and "small_compiled_unet_vae" in rows:
        c = rows["small_compiled_unet_vae"]
        out.append("- (minidiff's fully compiled small pipeline did not run: the targets below use the row with the UNet "
                   "and the VAE decoder compiled and the text encoder eager, for both libraries)")
    if s and c and c["minidiff"]["status"] == "ok" and s["diffusers"]["status"] == "ok":
        x = s["diffusers"]["time_s"] / c["minidiff"]["time_s"]
        out.append(f"- compiled small pipeline ≥ 1.5× faster than diffusers eager: {x:.2f}× "
                   f"{'✔' if x >= 1.5 else '✘'}")
    else: out.append("- compiled small pipeline ≥ 1.5× faster than diffusers eager: not measured")
    if c and c["minidiff"]["status"] == "ok" and c["diffusers"]["status"] == "ok":
        x = c["diffusers"]["time_s"] / c["minidiff"]["time_s"]
        out.append(f"- compiled small pipeline no slower than diffusers compiled: {x:.2f}× {'✔' if x >= 1 else '✘'}")
    else: out.append("- compiled small pipeline no slower than diffusers compiled: not measured")
    return "\n".join(out)

def render(res):
    "RESULTS.md from the results JSON."
    m, rows = res["machine"], res["rows"]
    lines = [f"# Benchmark results: minidiff against diffusers ({m['device']})", "",
             f"Command: `{res['command']}` (run on {res['date']}).", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, diffusers "
             f"{m['diffusers']}, transformers {m['transformers']}; minidiff at {m['commit']}; niceness {m['nice']}; "
             f"threads {res['threads']}.", "",
             "Ratios are minidiff / diffusers: below 1 minidiff is faster or leaner. Times are medians over the fresh "
             "processes (the range in brackets is over the interleaved pairs); peak MB is the whole process's peak "
             "(weights included), extra MB the timed calls' own. Load averages (1-minute) at each row's start and end "
             "are in the JSON; over the run: " + res.get("load_note", ""), ""]
    for g, title in GROUPS.items():
        names = [n for n in ROWS if n in rows and rows[n]["group"] == g]
        if not names: continue
        lines += [f"## {title}", "", row_table(rows, names), ""]
        if g == "parts" and layout_table(rows):
            lines += ["channels_last (opt-in) against the default layout, same process pairs' medians:", "",
                      layout_table(rows), ""]
        if g in ("compiled", "small") and compile_table(rows, names).count("\n") > 1:
            lines += ["Compile time (first call minus a steady call):", "", compile_table(rows, names), ""]
    lines += ["## Targets", "", targets(rows), "", "Plot: `python benchmarks/plot_results.py "
              f"{'benchmarks/' + res.get('json', 'RESULTS.json')}` (or `plot_results()` from a notebook).", ""]
    if res.get("notes"): lines += ["## Notes", "", *res["notes"], ""]
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every row on the small folder, 64², one pair: a smoke test")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), metavar="ROW",
                   help="rows to run (default: all but vae_1024*): " + " ".join(ROWS))
    p.add_argument("--repeats", type=int, default=3, help="process pairs per row")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--image-steps", type=int, default=None, help="steps measured in the batch-1 image rows (else 25)")
    p.add_argument("--weights", default=None, help="keep the full-size random weights in this folder (reused)")
    p.add_argument("--profile", metavar="ROW", choices=list(ROWS), default=None)
    p.add_argument("--out", default=None, help="markdown file (default: benchmarks/RESULTS[_quick][_cuda].md)")
    a = p.parse_args()
    if a.image_steps:
        for n in ROWS:
            if n.startswith("image_b1"): ROWS[n][2]["steps"] = a.image_steps
    out = Path(a.out or HERE/f"RESULTS{'_quick' if a.quick else ''}{'_cuda' if a.device == 'cuda' else ''}.md")
    tmp = tempfile.TemporaryDirectory()
    folders = dict(tiny=Path(tmp.name)/"tiny", full=Path(a.weights or Path(tmp.name)/"full"))
    from minidiff import save_tiny_sd
    save_tiny_sd(folders["tiny"])
    if a.profile:
        if not a.quick and not ROWS[a.profile][2].get("tiny") and not (folders["full"]/"unet").exists():
            save_full_size(folders["full"])
        return profile_row(a.profile, a, folders, a.threads)
    names = a.rows or DEFAULT
    if not a.quick and any(not ROWS[n][2].get("tiny") for n in names) and not (folders["full"]/"unet").exists():
        print("saving full-size random weights ...", flush=True); save_full_size(folders["full"])
    caches = {l: str(Path(tmp.name)/f"inductor_{l}") for l in LIBS}
    js = out.with_suffix(".json")
    res = json.loads(js.read_text()) if js.exists() else dict(rows={}, notes=[])
    res.update(json=js.name, machine=machine(a.device), threads=a.threads, date=datetime.date.today().isoformat(),
               command="python benchmarks/bench_suite.py" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:])))
    start = load()
    for n in names:
        print(f"{n}: {ROWS[n][1]} (load {load()[0]:.1f})", flush=True)
        res["rows"][n] = run_row(n, a, folders, a.threads, caches)
        res["load_note"] = f"load average at start {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f}, " \
                           f"at end {load()[0]:.2f} / {load()[1]:.2f} / {load()[2]:.2f} (1 / 5 / 15 min)."
        js.write_text(json.dumps(res, indent=1) + "\n"); out.write_text(render(res))
    print(render(res))

if __name__ == "__main__": main()
