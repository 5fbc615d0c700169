"""Stable Diffusion benchmarks: minidiff vs diffusers, CPU, each measurement in a fresh process.

1. the SD v1.5 UNet (real config, seeded random weights): one step, batch 2, 64x64 latents;
2. the SD v1.5 VAE (real config, seeded random weights): decode 1x4x64x64 -> 512x512;
3. a small model end to end: `save_tiny_sd`'s folder, 25 UniPC steps, guidance 7.5, 2 images. One more call runs
   under torch.profiler to split the time into the top-level aten ops (the kernels) and everything outside them
   (Python, module calls, the scheduler's bookkeeping): the per-step overhead. (With --device cuda the images come
   back as numpy arrays, so each timed call ends synchronised; the split is then the host side's.)
Run: python benchmarks/bench_sd.py [--threads N] [--repeats R] [--only unet|vae|pipeline] [--device cuda]
"""
import argparse, json, os, tempfile
from _common import ROOT, PEAK, measure, table

REAL = ROOT/"nbs"/"configs"/"runwayml_stable-diffusion-v1-5"

MODEL = PEAK + '''
import json, statistics, sys, time, torch
lib, part, folder, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import minidiff, diffusers
cls = getattr(minidiff if lib == "minidiff" else diffusers, "UNet2DConditionModel" if part == "unet" else "AutoencoderKL")
model = cls.from_pretrained(folder)
g = torch.Generator().manual_seed(0)
if part == "unet":
    x, emb = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    run = lambda: model(x, 500, encoder_hidden_states=emb).sample
else:
    z = torch.randn(1, 4, 64, 64, generator=g)
    run = lambda: model.decode(z).sample
times = []
with torch.no_grad():
    run()                                        # warm-up: touches every weight page once
    peak_so_far, base = peak_mb(), reset_peak()  # loading and the warm-up; then the peak restarts from here
    for _ in range(repeats):
        t0 = time.perf_counter(); out = run(); times.append(time.perf_counter() - t0)
print(json.dumps(dict(time_s=statistics.median(times), peak_mb=max(peak_so_far, peak_mb()), extra_mb=peak_mb() - base,
                      checksum=float(out.abs().sum()))))
'''

PIPELINE = PEAK + '''
import json, statistics, sys, time, torch
lib, folder, repeats, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if lib == "minidiff":
    from minidiff import StableDiffusionPipeline, UniPCMultistepScheduler
    pipe = StableDiffusionPipeline.from_pretrained(folder)
else:
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
pipe.to(device); pipe.set_progress_bar_config(disable=True)
kw = dict(prompt=["a photograph of an astronaut riding a horse", "a red cat"], num_inference_steps=25, output_type="np")
pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)])
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); out = pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    times.append(time.perf_counter() - t0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter(); pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in range(2)]); wall = time.perf_counter() - t0
top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]   # nested ops are inside these
kernels = sum(e.cpu_time_total for e in top) / 1e6
print(json.dumps(dict(time_s=statistics.median(times), peak_mb=peak_mb(), checksum=float(abs(out).sum()),
                      ops=len(top), kernel_s=kernels, outside_s=wall - kernels)))
'''

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count()); p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["unet", "vae", "pipeline"], default=None)
    p.add_argument("--device", default="cpu", help="where the small pipeline runs (the UNet and VAE parts stay on the CPU)")
    a = p.parse_args()
    import torch, diffusers
    from minidiff import save_tiny_sd
    rows = (("time_s", "time (s)"), ("peak_mb", "peak RSS (MB)"))
    with tempfile.TemporaryDirectory() as d:
        for part, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
            if a.only not in (None, part): continue
            torch.manual_seed(0)
            cls.from_config(json.loads((REAL/part/"config.json").read_text())).save_pretrained(f"{d}/{part}")
            res = {lib: measure(MODEL, lib, part, f"{d}/{part}", a.repeats, threads=a.threads) for lib in ("diffusers", "minidiff")}
            print(f"\n{'SD v1.5 UNet step, batch 2, 64x64 latents' if part == 'unet' else 'SD v1.5 VAE decode to 512x512'}\n")
            print(table(rows + (("extra_mb", "extra memory during the call (MB)"),), res))
        if a.only in (None, "pipeline"):
            save_tiny_sd(f"{d}/tiny")
            res = {lib: measure(PIPELINE, lib, f"{d}/tiny", a.repeats, a.device, threads=a.threads) for lib in ("diffusers", "minidiff")}
            print(f"\nsmall model end to end on {a.device}: 25 UniPC steps, guidance 7.5, 2 images of 64x64\n")
            print(table(rows + (("ops", "top-level aten ops (profiled call)"), ("kernel_s", "time in them (s)"),
                                ("outside_s", "time outside them (s)")), res))
            m = res["minidiff"]; kernel_share = m["kernel_s"] / (m["kernel_s"] + m["outside_s"])
            best = res["diffusers"]["time_s"] / (m["time_s"] * kernel_share)      # minidiff's kernels alone vs diffusers
            print(f"\nspeed-up over diffusers: {res['diffusers']['time_s'] / res['minidiff']['time_s']:.2f}x; "
                  f"with no time outside the kernels at all it could be at most {best:.2f}x")

if __name__ == "__main__": main()
