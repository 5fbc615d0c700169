"StableDiffusionImg2ImgPipeline: parity with diffusers over schedulers, strengths, inputs and batches; strength 1; bad inputs."
import numpy as np, PIL.Image, pytest, torch
import minidiff
from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, DDIMScheduler, save_tiny_sd
from minidiff.img2img import preprocess_image, encode_image

SCHEDULERS = ["PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

def ours(folder, scheduler=None):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder); pipe.set_progress_bar_config(disable=True)
    if scheduler: pipe.scheduler = getattr(minidiff, scheduler).from_config(pipe.scheduler.config)
    return pipe

def reference(folder, scheduler=None):
    import diffusers
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    if scheduler: ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    return ref

def gens(n, start=0): return [torch.Generator().manual_seed(start + i) for i in range(n)]

def picture(h=64, w=64, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)

def close(a, b, atol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    return float(np.abs(a - b).max())

@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_matches_diffusers(sd, scheduler, strength):
    a_pipe, b_pipe = ours(sd, scheduler), reference(sd, scheduler)
    kw = dict(prompt=["a red cat", "a blue dog"], negative_prompt=["blurry", ""], image=picture(), strength=strength,
              num_inference_steps=7, guidance_scale=7.5, output_type="np", eta=0.5)
    close(a_pipe(**kw, generator=gens(2)).images, b_pipe(**kw, generator=gens(2)).images)

@pytest.mark.parametrize("kind", ["pil", "np", "pt", "pt_batch", "pil_list", "odd_size"])
def test_inputs_and_generators_match_diffusers(sd, kind):
    a_pipe, b_pipe = ours(sd, "EulerDiscreteScheduler"), reference(sd, "EulerDiscreteScheduler")
    p = picture()
    image = {"pil": PIL.Image.fromarray((p * 255).astype(np.uint8)), "np": p, "pt": torch.from_numpy(p).permute(2, 0, 1),
             "pt_batch": torch.from_numpy(np.stack([p, picture(seed=1)])).permute(0, 3, 1, 2),
             "pil_list": [PIL.Image.fromarray((picture(seed=i) * 255).astype(np.uint8)) for i in range(2)],
             "odd_size": PIL.Image.fromarray((picture(70, 45) * 255).astype(np.uint8))}[kind]
    n = 2 if kind in ("pt_batch", "pil_list") else 1
    for g in (lambda: gens(2 * n), lambda: torch.Generator().manual_seed(5)):
        kw = dict(prompt=["a red cat"] * n, image=image, strength=0.6, num_inference_steps=6, num_images_per_prompt=2,
                  output_type="np")
        close(a_pipe(**kw, generator=g()).images, b_pipe(**kw, generator=g()).images)

def test_latents_output_and_no_guidance_match(sd):
    a_pipe, b_pipe = ours(sd), reference(sd)
    for kw in (dict(guidance_scale=1.0, output_type="np"), dict(guidance_scale=3.0, output_type="latent")):
        kw = dict(prompt="a cat", image=picture(), strength=0.8, num_inference_steps=5, **kw)
        a = a_pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        b = b_pipe(**kw, generator=torch.Generator().manual_seed(3)).images
        close(a, b)

@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_strength_one_is_text_to_image_from_the_noised_picture(sd, scheduler):
    "Strength 1 runs every step from add_noise(x0, eps, t_max), which is not pure noise: text-to-image from that start."
    pipe = ours(sd, scheduler); t2i = StableDiffusionPipeline(**pipe.components)
    kw = dict(num_inference_steps=6, output_type="np")
    a = pipe("a cat", image=picture(), strength=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(): x0 = encode_image(pipe.vae, preprocess_image(picture()), g)
    eps = torch.randn(x0.shape, generator=g)
    pipe.scheduler.set_timesteps(6)
    start = pipe.scheduler.add_noise(x0, eps, pipe.scheduler.timesteps[:1])
    close(a, t2i("a cat", latents=start / pipe.scheduler.init_noise_sigma, **kw).images, atol=1e-5)
    gap = np.abs(a - t2i("a cat", latents=eps, **kw).images).max()
    assert gap > 1e-3   # the picture's sqrt(alpha_bar) share at t_max is still in the start

def test_callback_and_interrupt_match_diffusers(sd):
    a_pipe, b_pipe = ours(sd, "UniPCMultistepScheduler"), reference(sd, "UniPCMultistepScheduler")
    seen = {"a": [], "b": []}
    def rec(key):
        def cb(p, i, t, kw):
            seen[key].append((i, int(t), kw["latents"].clone(), kw["prompt_embeds"].shape))
            if i == 3: p._interrupt = True
            return kw
        return cb
    kw = dict(prompt="a cat", image=picture(), strength=0.9, num_inference_steps=10, output_type="np",
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    a = a_pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=rec("a")).images
    b = b_pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=rec("b")).images
    assert [s[:2] for s in seen["a"]] == [s[:2] for s in seen["b"]] and len(seen["a"]) == 4
    for x, y in zip(seen["a"], seen["b"]): close(x[2], y[2]); assert x[3] == y[3]
    close(a, b)

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(strength=1.5), ValueError, "strength must be a number in [0, 1], got 1.5"),
    (dict(strength=-0.1), ValueError, "strength must be a number in [0, 1]"),
    (dict(strength="high"), ValueError, "strength must be a number in [0, 1]"),
    (dict(strength=0.05, num_inference_steps=10), ValueError, "runs no denoising step"),
    (dict(strength=0.0), ValueError, "runs no denoising step"),
    (dict(image="photo.png"), TypeError, "image must be a PIL image, a float array"),
    (dict(image=np.zeros((4, 4))), TypeError, "image must be a PIL image"),
    (dict(image=[]), TypeError, "image must be"),
    (dict(image=None), ValueError, "image is required"),
    (dict(image=torch.zeros(1, 2, 64, 64)), ValueError, "image must have 3 channels"),
    (dict(image=torch.zeros(3, 3, 64, 64)), ValueError, "got 3 images for 2 images to make"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["mask"]), ValueError,
     "callback_on_step_end_tensor_inputs must be among"),
])
def test_bad_inputs_have_clear_errors(sd, kwargs, err, msg):
    pipe = ours(sd)
    call = {"prompt": "a cat", "image": picture(), "num_inference_steps": 4, "num_images_per_prompt": 2, **kwargs}
    with pytest.raises(err) as e: pipe(**call)
    assert msg in str(e.value)
    assert pipe("a cat", image=picture(), strength=0.5, num_inference_steps=4, output_type="np").images.shape == (1, 64, 64, 3)

def test_loads_from_a_text_to_image_folder_and_shares_parts(sd):
    pipe = StableDiffusionImg2ImgPipeline(**StableDiffusionPipeline.from_pretrained(sd).components)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe("a cat", image=picture(), num_inference_steps=3, output_type="pt").images.shape == (1, 3, 64, 64)
