"""Peak memory and time of one large VAE decode (full-size SD v1.5 VAE config, random weights, float32, CPU), with and
without `enable_tiling()`. Each decode runs in a fresh process; memory is that process's own peak (VmHWM) above its
resident size just before the decode. The untiled child runs under an address-space limit, so that a decode that
does not fit fails in its own process instead of pushing the machine into swap or the OOM killer.

    python benchmarks/bench_tiling.py [--size 2048] [--threads 2] [--limit-gb 18] [--only tiled|untiled]
"""
import argparse, json
from _common import ROOT, PEAK, measure

CHILD = PEAK + '''
import json, resource, sys, time
from pathlib import Path
import torch
from minidiff import AutoencoderKL
size, tiling, limit_gb = int(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30),) * 2)
cfg = json.loads((Path(sys.argv[4])/"nbs/configs/runwayml_stable-diffusion-v1-5/vae/config.json").read_text())
torch.manual_seed(0)
vae = AutoencoderKL.from_config(cfg).eval()
if tiling: vae.enable_tiling()
z = torch.randn(1, 4, size // 8, size // 8)
base = reset_peak()
t0 = time.perf_counter()
try:
    with torch.no_grad(): img = vae.decode(z).sample
    res = dict(ok=True, finite=bool(torch.isfinite(img).all()), shape=list(img.shape))
except (RuntimeError, MemoryError) as e: res = dict(ok=False, error=str(e).splitlines()[0][:200])
print(json.dumps(dict(res, size=size, tiling=tiling, seconds=time.perf_counter() - t0, base_mb=base,
                      peak_mb=peak_mb(), extra_mb=peak_mb() - base)))
'''

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=18.0)
    ap.add_argument("--only", choices=["tiled", "untiled"], help="run one of the two decodes")
    a = ap.parse_args()
    modes = [t for t in (True, False) if a.only is None or a.only == ("tiled" if t else "untiled")]
    rows = [measure(CHILD, a.size, int(tiling), a.limit_gb, ROOT, threads=a.threads) for tiling in modes]
    print(f"| {a.size}x{a.size} decode, SD v1.5 VAE, float32, CPU ({a.threads} threads) | seconds | peak above "
          f"baseline (MiB) | process peak (MiB) |\n|---|---|---|---|")
    for r in rows:
        what = "tiled" if r["tiling"] else "untiled"
        if not r["ok"]: print(f"| {what} | failed: {r['error']} | > {a.limit_gb:.0f} GiB address space | |"); continue
        print(f"| {what} | {r['seconds']:.1f} | {r['extra_mb']:.0f} | {r['peak_mb']:.0f} |")
    print(json.dumps(rows))

if __name__ == "__main__": main()
