"""Every claim of the Reproducible pipelines lesson, on minidiff's StableDiffusionPipeline, DDPMPipeline and
DDIMPipeline (and against diffusers where minidiff claims its numbers): no generator differs, the same seed gives
the same bits, CPU generators, one generator per image, `latents=`, `enable_full_determinism`, bfloat16."""
import os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from minidiff import (DDIMPipeline, DDIMScheduler, DDPMPipeline, EulerDiscreteScheduler, StableDiffusionPipeline,
                      disable_full_determinism, enable_full_determinism, randn_tensor, save_tiny_sd)
from minidiff.core import MICRO_DDPM
from minidiff.ddim_pipeline import save_tiny_ddpm
from minidiff.reproducibility import FULL_DETERMINISM, TORCH_DEFAULTS, determinism_settings

PROMPT = "A bear is playing a guitar on Times Square"
SHA = "0000000000000000000000000000000000000000"

@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd"))

@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory): return save_tiny_ddpm(tmp_path_factory.mktemp("cifar"))

@pytest.fixture(autouse=True)
def restore_global_state():
    "No test leaves determinism switches, thread counts or a global seed behind."
    settings, threads = determinism_settings(), torch.get_num_threads()
    yield
    disable_full_determinism(settings); torch.set_num_threads(threads)

def quiet(p): p.set_progress_bar_config(disable=True); return p

def sd(folder, scheduler=None):
    p = quiet(StableDiffusionPipeline.from_pretrained(folder))
    if scheduler is not None: p.scheduler = scheduler.from_config(p.scheduler.config)
    return p

def ref_sd(folder, scheduler=None):
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    p = quiet(diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                                 requires_safety_checker=False))
    if scheduler is not None: p.scheduler = getattr(diffusers, scheduler.__name__).from_config(p.scheduler.config)
    return p

def linf(a, b):
    a, b = (np.asarray(x.float() if torch.is_tensor(x) else x, dtype=np.float64) for x in (a, b))
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())

def cosine(a, b):
    "Cosine similarity of two [0, 1] image batches, taken in the model's [-1, 1] space."
    a, b = (np.ravel(x).astype(np.float64) * 2 - 1 for x in (a, b))
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

def gen(seed): return torch.Generator(device="cpu").manual_seed(seed)

# one entry per pipeline: build it, then run it (n images, a generator or a list, or latents)
def run_sd(p, n, generator, **kw):
    return p(PROMPT, num_images_per_prompt=n, generator=generator, num_inference_steps=6, output_type="np", **kw).images
def run_image(p, n, generator, **kw):
    return p(batch_size=n, generator=generator, num_inference_steps=6, output_type="np", **kw).images

PIPELINES = {
    "sd-pndm": (lambda d: sd(d["sd"]), run_sd),
    "sd-ddim-eta1": (lambda d: sd(d["sd"], DDIMScheduler), lambda p, n, g: run_sd(p, n, g, eta=1.0)),
    "ddpm": (lambda d: quiet(DDPMPipeline.from_pretrained(d["ddpm"])), run_image),
    "ddim-eta0": (lambda d: quiet(DDIMPipeline.from_pretrained(d["ddpm"])), run_image),
    "ddim-eta1": (lambda d: quiet(DDIMPipeline.from_pretrained(d["ddpm"])),
                  lambda p, n, g: run_image(p, n, g, eta=1.0)),
}

@pytest.fixture
def dirs(sd_dir, ddpm_dir): return {"sd": sd_dir, "ddpm": ddpm_dir}

@pytest.mark.parametrize("name", PIPELINES)
def test_no_generator_differs_same_seed_identical_bits(dirs, name):
    build, run = PIPELINES[name]; p = build(dirs)
    assert linf(run(p, 1, None), run(p, 1, None)) > 1e-3          # no generator: the global RNG moves on
    a, b = run(p, 2, gen(0)), run(p, 2, gen(0))
    assert np.array_equal(a, b) and np.isfinite(a).all()          # same seed twice: identical bits
    torch.manual_seed(5); c = run(p, 2, None)
    torch.manual_seed(5); assert np.array_equal(c, run(p, 2, None))   # the tutorial's torch.manual_seed(0) form

@pytest.mark.parametrize("name", PIPELINES)
def test_per_image_generators(dirs, name):
    "Image i of a batch made with generators [g0, g1, g2] is the single run with generator i (within 1e-4)."
    build, run = PIPELINES[name]; p = build(dirs)
    batch = run(p, 3, [gen(10 + i) for i in range(3)])
    singles = [run(p, 1, gen(10 + i))[0] for i in range(3)]
    for i in range(3): assert linf(batch[i], singles[i]) <= 1e-4
    assert linf(batch[0], batch[1]) > 1e-2                         # the images are different pictures
    assert linf(run(p, 1, [gen(11)])[0], singles[1]) <= 1e-4      # a list of one is that generator

@pytest.mark.parametrize("scheduler", [None, DDIMScheduler, EulerDiscreteScheduler])
def test_per_image_generators_match_diffusers(sd_dir, scheduler):
    ours, ref = sd(sd_dir, scheduler), ref_sd(sd_dir, scheduler)
    a = run_sd(ours, 3, [gen(10 + i) for i in range(3)]); b = run_sd(ref, 3, [gen(10 + i) for i in range(3)])
    assert linf(a, b) <= 1e-4

@pytest.mark.parametrize("scheduler", [None, DDIMScheduler, EulerDiscreteScheduler])
def test_latents_equal_to_generator_noise(sd_dir, scheduler):
    "latents= holding the generator's (unscaled) noise gives the generator's image; Euler scales it by sigma_max."
    ours, ref = sd(sd_dir, scheduler), ref_sd(sd_dir, scheduler)
    shape = (2, ours.unet.config.in_channels, ours.unet.config.sample_size, ours.unet.config.sample_size)
    latents = randn_tensor(shape, [gen(3), gen(4)])
    a = run_sd(ours, 2, None, latents=latents)
    assert np.array_equal(a, run_sd(ours, 2, [gen(3), gen(4)]))
    assert linf(a, run_sd(ref, 2, None, latents=latents)) <= 1e-4

def test_cpu_generator_noise_is_device_independent():
    "The noise comes from the generator's device and is moved, so a CPU seed gives the same numbers everywhere."
    shape = (2, 4, 8, 8)
    expected = torch.randn(shape, generator=gen(0))
    assert torch.equal(randn_tensor(shape, gen(0), device="cpu"), expected)
    per_image = randn_tensor(shape, [gen(0), gen(1)])
    assert torch.equal(per_image[1], torch.randn(shape[1:], generator=gen(1)))

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_same_image_on_gpu(dirs):
    for name in ("sd-pndm", "ddim-eta1"):
        build, run = PIPELINES[name]; p = build(dirs)
        cpu = run(p, 1, gen(0)); p.to("cuda")
        assert linf(run(p, 1, gen(0)), cpu) <= 1e-3                 # same noise; GPU kernels round differently
        assert linf(run(p, 1, torch.Generator("cuda").manual_seed(0)), cpu) > 1e-2   # a CUDA generator is other noise

def test_enable_full_determinism_switches():
    before = determinism_settings()
    previous = enable_full_determinism()
    assert previous == before and determinism_settings() == FULL_DETERMINISM
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    disable_full_determinism(previous)
    assert determinism_settings() == before
    enable_full_determinism(warn_only=True)
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    disable_full_determinism()
    assert determinism_settings() == TORCH_DEFAULTS and "CUBLAS_WORKSPACE_CONFIG" not in os.environ

def test_same_torch_switches_as_diffusers():
    "diffusers' enable_full_determinism sets the same torch switches (it also sets CUDA_LAUNCH_BLOCKING, we do not)."
    from diffusers.utils.torch_utils import enable_full_determinism as theirs
    blocking = os.environ.get("CUDA_LAUNCH_BLOCKING")
    try:
        theirs(); expected = determinism_settings()
    finally:
        if blocking is None: os.environ.pop("CUDA_LAUNCH_BLOCKING", None)
        else: os.environ["CUDA_LAUNCH_BLOCKING"] = blocking
    disable_full_determinism(); enable_full_determinism()
    keys = ["CUBLAS_WORKSPACE_CONFIG", "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
            "matmul_tf32"]
    assert {k: determinism_settings()[k] for k in keys} == {k: expected[k] for k in keys}

def test_pythonhashseed_reaches_subprocesses():
    enable_full_determinism()
    code = [sys.executable, "-c", "print(hash('minidiff'))"]
    assert subprocess.run(code, capture_output=True, text=True, check=True).stdout == \
        subprocess.run(code, capture_output=True, text=True, check=True).stdout

def two_runs(p):
    "The tutorial's last cell: one CPU generator reseeded before each of two 50-step runs; L_inf of the latents."
    g = torch.Generator(device="cpu")
    g.manual_seed(0); result1 = p(prompt=PROMPT, num_inference_steps=50, generator=g, output_type="latent").images
    g.manual_seed(0); result2 = p(prompt=PROMPT, num_inference_steps=50, generator=g, output_type="latent").images
    assert torch.isfinite(result1).all()
    return float(abs(result1 - result2).max())

def test_two_runs_linf_with_and_without_determinism(dirs):
    p = sd(dirs["sd"], DDIMScheduler)
    without = two_runs(p)
    enable_full_determinism()
    with_determinism = two_runs(p)
    for name in PIPELINES:                                  # no op of any pipeline lacks a deterministic CPU kernel
        build, run = PIPELINES[name]; q = build(dirs); assert np.array_equal(run(q, 2, gen(1)), run(q, 2, gen(1)))
    print(f"\nL_inf two SD+DDIM runs: without {without}, with enable_full_determinism {with_determinism}")
    assert with_determinism == 0.0 and without == 0.0      # on the CPU torch is deterministic for a fixed thread count

def test_thread_count_changes_the_rounding(sd_dir):
    "What determinism does not promise: the same numbers with another thread count (the lesson's caveat)."
    p = sd(sd_dir)
    torch.set_num_threads(1); one = p(PROMPT, num_inference_steps=6, generator=gen(0), output_type="latent").images
    torch.set_num_threads(2); two = p(PROMPT, num_inference_steps=6, generator=gen(0), output_type="latent").images
    print(f"\nL_inf latents, 1 vs 2 threads: {linf(one, two):.3g}")
    assert linf(one, two) <= 1e-3

def test_bfloat16_close_to_float32(dirs):
    p, d = sd(dirs["sd"]), quiet(DDIMPipeline.from_pretrained(dirs["ddpm"]))
    def images(): return (p(PROMPT, num_inference_steps=20, generator=gen(0), output_type="np").images,
                          d(num_inference_steps=2, generator=gen(0), output_type="np").images)
    f32 = images()
    p.to(torch_dtype=torch.bfloat16); d.to(torch_dtype=torch.bfloat16)
    assert p.unet.dtype == d.unet.dtype == torch.bfloat16
    bf16 = images()
    sims = [cosine(a, b) for a, b in zip(f32, bf16)]
    print(f"\ncosine similarity bfloat16 vs float32: SD 20 steps {sims[0]:.6f}, DDIM 2 steps {sims[1]:.6f}")
    assert min(sims) > 0.999

@pytest.mark.parametrize("eta,steps", [(0.0, 50), (1.0, 10)])
def test_bfloat16_ddim_matches_diffusers(ddpm_dir, eta, steps):
    "bfloat16 DDIM equals diffusers' bfloat16 DDIM, so the drift of the random model at 50 steps is the model's own."
    import diffusers
    ours = quiet(DDIMPipeline.from_pretrained(ddpm_dir, torch_dtype=torch.bfloat16))
    ref = quiet(diffusers.DDIMPipeline.from_pretrained(ddpm_dir)).to(dtype=torch.bfloat16)
    assert ref.unet.dtype == torch.bfloat16
    kw = dict(eta=eta, num_inference_steps=steps, output_type="pt")   # diffusers cannot make "np" from bfloat16
    a, b = ours(generator=gen(0), **kw).images, ref(generator=gen(0), **kw).images
    assert a.dtype == b.dtype == torch.bfloat16 and linf(a, b) <= 1e-4

@pytest.fixture(scope="module")
def micro_ddim():
    "The shipped micro DDPM as DDIMPipeline, in float32 and in bfloat16 (loaded separately, never cast back)."
    dtypes = (torch.float32, torch.bfloat16)
    return {dt: quiet(DDIMPipeline.from_pretrained(MICRO_DDPM, torch_dtype=dt)) for dt in dtypes}

def pairwise_rms(a, b):
    "(B, B): root-mean-square distance of every image of `a` to every image of `b`."
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) / a[0].numel() ** 0.5

def micro_pictures(p, n, **kw):
    "n pictures, seeds 0..n-1, in the model's [-1, 1] units, float32."
    return 2 * p(batch_size=n, generator=[gen(i) for i in range(n)], output_type="pt", **kw).images.float() - 1

@pytest.mark.parametrize("eta,steps", [(0.0, 2), (0.0, 25), (1.0, 2), (1.0, 25)])
def test_bfloat16_keeps_the_micro_ddpm_pictures(micro_ddim, eta, steps):
    "The lesson's bound: every bf16 picture is nearest its own float32 picture; the median moves < half the gap."
    n = 8
    f32, bf16 = (micro_pictures(micro_ddim[dt], n, eta=eta, num_inference_steps=steps) for dt in micro_ddim)
    assert torch.isfinite(f32).all() and torch.isfinite(bf16).all()
    d, others = pairwise_rms(bf16, f32), pairwise_rms(f32, f32) + 1e9 * torch.eye(n)
    ratio = d.diag() / others.min(1).values
    print(f"\nbf16 vs float32, eta {eta}, {steps} steps: rms median {d.diag().median():.2e}, "
          f"over the nearest other seed's distance: median {ratio.median():.3f}, max {ratio.max():.3f}")
    assert torch.equal(d.argmin(1), torch.arange(n)) and ratio.median() < 0.5

def test_ddim_does_not_amplify_a_one_ulp_nudge(micro_ddim):
    "float32 DDIM from the noise moved one ulp moves the picture by < 1/100 of what bf16 moves it: no chaos."
    p, n, steps = micro_ddim[torch.float32], 4, 25
    def ddim_from(x):   # DDIMPipeline's loop from the starting noise x, in [-1, 1]
        p.scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in p.scheduler.timesteps: x = p.scheduler.step(p.unet(x, t).sample, t, x).prev_sample
        return 2 * (x / 2 + 0.5).clamp(0, 1) - 1
    x = randn_tensor((n, 3, 32, 32), [gen(i) for i in range(n)])
    f32 = ddim_from(x)
    assert torch.equal(f32, micro_pictures(p, n, num_inference_steps=steps))   # the loop is the pipeline's
    def rms(y): return (y - f32).flatten(1).pow(2).mean(1).sqrt()   # (B,)
    nudged = rms(ddim_from(torch.nextafter(x, x + 1)))
    bf16 = rms(micro_pictures(micro_ddim[torch.bfloat16], n, num_inference_steps=steps))
    print(f"\nrms change, one-ulp nudge {nudged.max():.2e}, bf16 {bf16.median():.2e}")
    assert torch.isfinite(nudged).all() and nudged.max() < bf16.median() / 100

@pytest.mark.parametrize("eta,steps", [(0.0, 25), (1.0, 10)])
def test_bfloat16_micro_ddpm_is_diffusers_bit_for_bit(eta, steps):
    "diffusers' bfloat16 DDIMPipeline on the shipped micro DDPM draws minidiff's bfloat16 pictures exactly."
    import diffusers
    ours = quiet(DDIMPipeline.from_pretrained(MICRO_DDPM, torch_dtype=torch.bfloat16))
    ref = quiet(diffusers.DDIMPipeline.from_pretrained(MICRO_DDPM)).to(dtype=torch.bfloat16)
    kw = dict(batch_size=2, eta=eta, num_inference_steps=steps, output_type="pt")
    a, b = ours(generator=gen(0), **kw).images, ref(generator=gen(0), **kw).images
    assert a.dtype == b.dtype == torch.bfloat16 and torch.isfinite(a.float()).all() and torch.equal(a, b)

def test_bfloat16_sd_matches_diffusers(sd_dir):
    "The tiny SD pipeline in bfloat16 gives diffusers' bfloat16 latents."
    ours = sd(sd_dir).to(torch_dtype=torch.bfloat16); ref = ref_sd(sd_dir).to(dtype=torch.bfloat16)
    kw = dict(num_images_per_prompt=2, num_inference_steps=6, output_type="latent")
    x = ours(PROMPT, generator=[gen(0), gen(1)], **kw).images; y = ref(PROMPT, generator=[gen(0), gen(1)], **kw).images
    assert x.dtype == y.dtype == torch.bfloat16 and linf(x, y) <= 1e-4

def fake_hub_cache(root, folder, repo_id):
    repo = Path(root)/("models--" + repo_id.replace("/", "--"))
    (repo/"refs").mkdir(parents=True); (repo/"refs"/"main").write_text(SHA)
    shutil.copytree(folder, repo/"snapshots"/SHA)
    return root

TUTORIAL_SD = '''
import torch
from {lib} import DDIMScheduler, StableDiffusionPipeline
import numpy as np

model_id = "runwayml/stable-diffusion-v1-5"
pipe = StableDiffusionPipeline.from_pretrained(model_id{extra}).to("cpu")
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
g = torch.Generator(device="cpu")

prompt = "A bear is playing a guitar on Times Square"

g.manual_seed(0)
result1 = pipe(prompt=prompt, num_inference_steps=50, generator=g, output_type="latent").images

g.manual_seed(0)
result2 = pipe(prompt=prompt, num_inference_steps=50, generator=g, output_type="latent").images

print("L_inf dist = ", abs(result1 - result2).max())
print(repr(float(result1.abs().sum())))
'''

def test_tutorial_sd_code_unchanged(sd_dir, tmp_path):
    "The tutorial's Stable Diffusion cell, only the import changed (cuda -> cpu): L_inf 0, and diffusers' latents."
    env = {**os.environ, "HF_HUB_CACHE": str(fake_hub_cache(tmp_path, sd_dir, "runwayml/stable-diffusion-v1-5")),
           "HF_HUB_OFFLINE": "1"}
    no_checker = ", safety_checker=None, feature_extractor=None, requires_safety_checker=False"
    extra = {"minidiff": "", "diffusers": no_checker}
    outs = [subprocess.run([sys.executable, "-c", TUTORIAL_SD.format(lib=lib, extra=extra[lib])], check=True, env=env,
                           capture_output=True, text=True).stdout.strip().splitlines()[-2:] for lib in extra]
    assert outs[0][0] == "L_inf dist =  tensor(0.)" and outs[0] == outs[1]
