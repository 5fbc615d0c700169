"Shared by the benchmark scripts: run one measurement per library in a fresh process, print a ratio table."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

def measure(child_code, *args, threads=None):
    "Run `child_code` (which prints one JSON line last) in a fresh interpreter; return the parsed dict."
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads or os.cpu_count())}
    out = subprocess.run([sys.executable, "-c", child_code, *map(str, args)], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])

def table(rows, res):
    "Markdown table of `rows` (key, label) for res['diffusers'] and res['minidiff'], with minidiff / diffusers."
    lines = ["| measure | diffusers | minidiff | minidiff / diffusers |", "|---|---|---|---|"]
    for k, name in rows:
        d, m = res["diffusers"][k], res["minidiff"][k]
        lines.append(f"| {name} | {d:.3f} | {m:.3f} | {m / d:.2f} |" if d else f"| {name} | {d:.3f} | {m:.3f} | n/a |")
    return "\n".join(lines)

# Memory from /proc/self/status: VmHWM is this program's own peak. (ru_maxrss is not: after fork + exec it starts
# from the parent's resident size, so a parent holding a big model would set every child's "peak".)
PEAK = '''
import re
def _mb(field): return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
def peak_mb(): return _mb("VmHWM")
def reset_peak():
    "Set the peak back to the current resident size and return that (MB), to measure one call's extra memory."
    open("/proc/self/clear_refs", "w").write("5"); return _mb("VmRSS")
'''
