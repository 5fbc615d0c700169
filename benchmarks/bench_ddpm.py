"""DDPM benchmark: minidiff vs diffusers on the real google/ddpm-cat-256 config (seeded random weights), CPU.

Each library runs in its own fresh process, so peak memory is its own: load time (`UNet2DModel.from_pretrained`),
one 256x256 UNet step, and peak resident memory.  Run: python benchmarks/bench_ddpm.py [--threads N] [--repeats R]
"""
import argparse, json, os, tempfile
from _common import ROOT, PEAK, measure, table

CONFIG = ROOT/"nbs"/"configs"/"google_ddpm-cat-256"

CHILD = PEAK + '''
import json, statistics, sys, time, torch
lib, folder, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
if lib == "minidiff": from minidiff import UNet2DModel
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
print(json.dumps(dict(load_s=statistics.median(loads), step_s=statistics.median(steps), peak_mb=peak_mb(),
                      checksum=float(out.abs().sum()))))
'''

def main():
    p = argparse.ArgumentParser(); p.add_argument("--threads", type=int, default=os.cpu_count()); p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import torch, diffusers
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        diffusers.UNet2DModel.from_config(json.loads((CONFIG/"config.json").read_text())).save_pretrained(d)
        res = {lib: measure(CHILD, lib, d, a.repeats, threads=a.threads) for lib in ("diffusers", "minidiff")}
    print(table((("load_s", "load time (s)"), ("step_s", "one 256x256 UNet step (s)"), ("peak_mb", "peak RSS (MB)")), res))
    print(f"output checksums: diffusers {res['diffusers']['checksum']:.4f}, minidiff {res['minidiff']['checksum']:.4f}")

if __name__ == "__main__": main()
