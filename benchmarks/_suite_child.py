"""One measurement of the benchmark suite, in a fresh interpreter: `python _suite_child.py '<json spec>'`.

The spec names the library ("minidiff" or "diffusers"), the kind of work ("text", "unet", "vae", "pipe"), the weights
folder and the options (batch, resolution, steps, slicing, tiling, compile). The child loads only its own library,
does one warm-up call (this is where torch.compile compiles), then `inner` timed calls, and prints one JSON line last:
the median time, the compile time, the peak memory of the whole process (CPU: VmHWM; CUDA: max_memory_allocated) and
the extra memory of the timed calls alone. A missing method (a feature not built yet) prints {"na": reason}.
"""
import functools, json, re, statistics, sys, time
spec = json.loads(sys.argv[1])
import torch

lib, kind, dev = spec["lib"], spec["kind"], spec["device"]
cuda = dev == "cuda"
dtype = torch.float16 if cuda else torch.float32
load_kw = dict(torch_dtype=dtype) if cuda else {}

def now():
    "Wall time, after the device has finished what it was given."
    if cuda: torch.cuda.synchronize()
    return time.perf_counter()

def _mb(field): return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
def peak_mb(): return torch.cuda.max_memory_allocated() / 2**20 if cuda else _mb("VmHWM")
def reset_peak():
    "Restart the peak from what is in use now (returned, MB)."
    if cuda: torch.cuda.reset_peak_memory_stats(); return torch.cuda.memory_allocated() / 2**20
    open("/proc/self/clear_refs", "w").write("5"); return _mb("VmRSS")

def done(**kw): print(json.dumps(kw)); sys.exit(0)
def need(obj, name):
    if not hasattr(obj, name): done(na=f"n/a (not available: {type(obj).__name__}.{name})")

def compile_(m): return torch.compile(m, fullgraph=True)

def model_cls(name):
    if lib == "minidiff":
        import minidiff; return getattr(minidiff, name)
    if name == "CLIPTextModel":
        import transformers; return transformers.CLIPTextModel
    import diffusers; return getattr(diffusers, name)

def load_pipe():
    if lib == "minidiff":
        from minidiff import StableDiffusionPipeline, UniPCMultistepScheduler
        pipe = StableDiffusionPipeline.from_pretrained(spec["folder"], **load_kw)
    else:
        from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
        pipe = StableDiffusionPipeline.from_pretrained(spec["folder"], safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **load_kw)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.to(dev); pipe.set_progress_bar_config(disable=True)
    return pipe

def stamp_steps(scheduler, stamps):
    "Record the time each scheduler step ends (one per denoising step), keeping `step`'s signature for the pipeline."
    step = scheduler.step
    @functools.wraps(step)
    def timed(*a, **kw):
        out = step(*a, **kw); stamps.append(now()); return out
    scheduler.step = timed

g = torch.Generator().manual_seed(0)
b, res, steps = spec.get("batch", 1), spec.get("res", 512), spec.get("steps", 25)
stamps, extra = [], {}
if kind == "text":
    model = model_cls("CLIPTextModel").from_pretrained(f"{spec['folder']}/text_encoder", **load_kw).to(dev).eval()
    if spec.get("compiled"): model = compile_(model)
    ids = torch.randint(0, 49408, (b, 77), generator=g).to(dev)
    fn = lambda: model(ids)[0]
elif kind == "unet":
    model = model_cls("UNet2DConditionModel").from_pretrained(f"{spec['folder']}/unet", **load_kw).to(dev).eval()
    if spec.get("sliced"): need(model, "set_attention_slice"); model.set_attention_slice("auto")
    if spec.get("compiled"): model = compile_(model)
    inp = [torch.randn(b, 4, res // 8, res // 8, generator=g).to(dev, dtype)]
    emb = torch.randn(b, 77, model.config.cross_attention_dim, generator=g).to(dev, dtype)
    t = torch.tensor(500, device=dev)
    fn = lambda: model(inp[0], t, encoder_hidden_states=emb).sample
elif kind == "vae":
    model = model_cls("AutoencoderKL").from_pretrained(f"{spec['folder']}/vae", **load_kw).to(dev).eval()
    if spec.get("tiled"): need(model, "enable_tiling"); model.enable_tiling()
    if spec.get("sliced"): need(model, "enable_slicing"); model.enable_slicing()
    if spec.get("compiled"): model.decoder = compile_(model.decoder)
    inp = [torch.randn(b, 4, res // 8, res // 8, generator=g).to(dev, dtype)]
    fn = lambda: model.decode(inp[0]).sample
else:
    pipe = load_pipe()
    if spec.get("sliced"): need(pipe, "enable_attention_slicing"); pipe.enable_attention_slicing()
    if spec.get("compiled"):
        pipe.unet = compile_(pipe.unet)
        if spec.get("compile_text", True): pipe.text_encoder = compile_(pipe.text_encoder)
        pipe.vae.decoder = compile_(pipe.vae.decoder)
    stamp_steps(pipe.scheduler, stamps)
    prompts = ["a photograph of an astronaut riding a horse", "a red cat sitting on a wall"] * 4
    kw = dict(prompt=(prompts * (b // len(prompts) + 1))[:b], height=res, width=res, guidance_scale=7.5,
              output_type="np")
    def fn(n=steps):
        stamps.clear()
        return pipe(**kw, num_inference_steps=n, generator=[torch.Generator().manual_seed(i) for i in range(b)]).images

def layout(fmt):
    "Put the model's weights and its input in memory format `fmt` (torch.channels_last or torch.contiguous_format)."
    model.to(memory_format=fmt); inp[0] = inp[0].contiguous(memory_format=fmt)

if spec.get("channels_last"): layout(torch.channels_last)
with torch.no_grad():
    try:
        t0 = now(); out = fn() if kind != "pipe" else fn(spec.get("warm_steps", steps)); first = now() - t0
    except Exception as e:                                  # e.g. a graph break under fullgraph=True
        done(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    peak_before, base = peak_mb(), reset_peak()
    times = []
    for _ in range(spec.get("inner", 1)):
        t0 = now(); out = fn(); times.append(now() - t0)
    if kind == "pipe":                                      # per-step time from the last call's step stamps
        d = [b_ - a_ for a_, b_ in zip(stamps, stamps[1:])]
        extra = dict(per_step_s=statistics.median(d) if d else None, steps=steps)
        if d: extra["fixed_s"] = statistics.median(times) - steps * extra["per_step_s"]
    prof = None
    if spec.get("profile"):
        from torch.profiler import profile, ProfilerActivity
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as p: fn()
        avg = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
        prof = [dict(name=e.key, calls=e.count, self_s=e.self_cpu_time_total / 1e6, total_s=e.cpu_time_total / 1e6)
                for e in avg]
        top = [e for e in p.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        extra.update(top_ops=len(top), kernel_s=sum(e.cpu_time_total for e in top) / 1e6)
if spec.get("channels_last"):                          # the same call in the default layout: how far the numbers move
    with torch.no_grad(): layout(torch.contiguous_format); ref = fn()
    extra["layout_max_diff"] = float((out.float() - ref.float()).abs().max())
out = torch.as_tensor(out).float()
steady_first = statistics.median(times)            # what the first call would take without compiling
if kind == "pipe" and extra.get("fixed_s") is not None:
    steady_first = extra["fixed_s"] + spec.get("warm_steps", steps) * extra["per_step_s"]
done(time_s=statistics.median(times), times=times, first_s=first, compile_s=(first - steady_first) if
     spec.get("compiled") else None, peak_mb=max(peak_before, peak_mb()), extra_mb=peak_mb() - base,
     finite=bool(out.isfinite().all()), checksum=float(out.abs().double().sum()), profile=prof, **extra)
