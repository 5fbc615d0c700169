"""DDPM benchmark: minidiff vs diffusers on the real google/ddpm-cat-256 config (seeded random weights), CPU.

Measures, each library in its own fresh process so peak memory is its own:
load time (`UNet2DModel.from_pretrained`), one 256x256 UNet step, and peak resident memory.
Run: python benchmarks/bench_ddpm.py [--threads N] [--repeats R]
"""
import argparse, json, os, subprocess, sys, tempfile, textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIG = ROOT/"nbs"/"configs"/"google_ddpm-cat-256"

CHILD = textwrap.dedent('''
import json, resource, statistics, sys, time, torch
lib, folder, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if lib == "minidiff": from minidiff.unet2d import UNet2DModel
else: from diffusers import UNet2DModel
loads = []
for _ in range(repeats):
    t0 = time.perf_counter(); unet = UNet2DModel.from_pretrained(folder); loads.append(time.perf_counter() - t0)
x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
steps = []
with torch.no_grad():
    unet(x, 500)
    for _ in range(repeats):
        t0 = time.perf_counter(); out = unet(x, 500).sample; steps.append(time.perf_counter() - t0)
print(json.dumps(dict(load_s=statistics.median(loads), step_s=statistics.median(steps),
                      peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, checksum=float(out.abs().sum()))))
''')

def make_folder(d):
    import shutil, torch, diffusers
    torch.manual_seed(0)
    diffusers.UNet2DModel.from_config(json.loads((CONFIG/"config.json").read_text())).save_pretrained(d)
    return d

def main():
    p = argparse.ArgumentParser(); p.add_argument("--threads", type=int, default=os.cpu_count()); p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        make_folder(d)
        res = {}
        for lib in ("diffusers", "minidiff"):
            out = subprocess.run([sys.executable, "-c", CHILD, lib, d, str(a.threads), str(a.repeats)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
            res[lib] = json.loads(out.strip().splitlines()[-1])
    print(f"| measure | diffusers | minidiff | minidiff / diffusers |\n|---|---|---|---|")
    for k, name in (("load_s", "load time (s)"), ("step_s", "one 256x256 UNet step (s)"), ("peak_mb", "peak RSS (MB)")):
        print(f"| {name} | {res['diffusers'][k]:.3f} | {res['minidiff'][k]:.3f} | {res['minidiff'][k] / res['diffusers'][k]:.2f} |")
    print(f"output checksums: diffusers {res['diffusers']['checksum']:.4f}, minidiff {res['minidiff']['checksum']:.4f}")

if __name__ == "__main__": main()
