"StableDiffusionInpaintPipeline: parity with diffusers for the 9-channel inpainting UNet and the 4-channel blend; bad inputs."
import numpy as np, PIL.Image, pytest, torch
import minidiff
from minidiff import StableDiffusionInpaintPipeline, DiffusionPipeline, save_tiny_sd, save_tiny_inpaint_sd

@pytest.fixture(scope="module")
def sd9(tmp_path_factory): return save_tiny_inpaint_sd(tmp_path_factory.mktemp("sd9")/"sd-inpainting")

@pytest.fixture(scope="module")
def sd4(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd4")/"sd-v1-5")

def ours(folder, scheduler=None):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder); pipe.set_progress_bar_config(disable=True)
    if scheduler: pipe.scheduler = getattr(minidiff, scheduler).from_config(pipe.scheduler.config)
    return pipe

def reference(folder, scheduler=None):
    import diffusers
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    if scheduler: ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    return ref

def gens(n): return [torch.Generator().manual_seed(i) for i in range(n)]

def picture(h=64, w=64, seed=0): return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)

def square(h=64, w=64):
    m = np.zeros((h, w), np.float32); m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return m

def close(a, b, atol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    return float(np.abs(a - b).max())

def test_folder_loads_as_the_inpainting_pipeline(sd9):
    pipe = DiffusionPipeline.from_pretrained(sd9)
    assert type(pipe) is StableDiffusionInpaintPipeline and pipe.unet.config.in_channels == 9

@pytest.mark.parametrize("layout", ["sd9", "sd4"])
@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
                                       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_diffusers(request, layout, scheduler, strength):
    folder = request.getfixturevalue(layout)
    a_pipe, b_pipe = ours(folder, scheduler), reference(folder, scheduler)
    kw = dict(prompt=["a red cat", "a blue dog"], negative_prompt=["blurry", ""], image=picture(), mask_image=square(),
              strength=strength, num_inference_steps=6, output_type="np", eta=0.5)
    close(a_pipe(**kw, generator=gens(2)).images, b_pipe(**kw, generator=gens(2)).images)

@pytest.mark.parametrize("layout", ["sd9", "sd4"])
def test_inputs_batches_and_single_generator_match(request, layout):
    folder = request.getfixturevalue(layout)
    a_pipe, b_pipe = ours(folder, "EulerDiscreteScheduler"), reference(folder, "EulerDiscreteScheduler")
    pil = PIL.Image.fromarray((picture(80, 72) * 255).astype(np.uint8))
    mask = PIL.Image.fromarray((square(80, 72) * 255).astype(np.uint8)).convert("RGB")
    cases = [dict(image=pil, mask_image=mask),                                               # resized to 64x64
             dict(image=torch.from_numpy(np.stack([picture(), picture(seed=1)])).permute(0, 3, 1, 2),
                  mask_image=torch.from_numpy(square())[None], prompt=["a", "b"]),
             dict(image=picture(), mask_image=square(), guidance_scale=1.0, strength=0.7),
             dict(image=picture(), mask_image=square()[..., None], output_type="latent")]
    for case in cases:
        kw = {"prompt": "a cat", "num_inference_steps": 5, "num_images_per_prompt": 2, "output_type": "np", **case}
        n = 2 * (len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1)
        for g in (lambda: torch.Generator().manual_seed(1), lambda: gens(n)):
            close(a_pipe(**kw, generator=g()).images, b_pipe(**kw, generator=g()).images)

def test_given_latents_match(sd9):
    a_pipe, b_pipe = ours(sd9), reference(sd9)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt="a cat", image=picture(), mask_image=square(), num_inference_steps=4, output_type="np", latents=lat)
    g = lambda: torch.Generator().manual_seed(0)   # the masked picture is still sampled from the VAE posterior
    close(a_pipe(**kw, generator=g()).images, b_pipe(**kw, generator=g()).images)

def test_four_channel_blend_keeps_the_known_latents(sd4):
    pipe = ours(sd4, "DDIMScheduler")
    from minidiff.img2img import encode_image, preprocess_image
    lat = pipe("a cat", image=picture(), mask_image=square(), num_inference_steps=5, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad(): x0 = encode_image(pipe.vae, preprocess_image(picture()), torch.Generator().manual_seed(0))
    keep = torch.ones(1, 1, 8, 8); keep[..., 2:6, 2:6] = 0
    assert torch.equal(lat * keep, x0 * keep) and not torch.equal(lat, x0)

def test_callback_sees_mask_and_stops_like_diffusers(sd9):
    a_pipe, b_pipe = ours(sd9), reference(sd9)
    seen = {"a": [], "b": []}
    def rec(key):
        def cb(p, i, t, kw):
            seen[key].append((kw["latents"].clone(), kw["mask"].clone(), kw["masked_image_latents"].clone()))
            if i == 2: p._interrupt = True
            return kw
        return cb
    kw = dict(prompt="a cat", image=picture(), mask_image=square(), num_inference_steps=6, output_type="np",
              callback_on_step_end_tensor_inputs=["latents", "mask", "masked_image_latents"])
    a = a_pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=rec("a")).images
    b = b_pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=rec("b")).images
    assert len(seen["a"]) == len(seen["b"]) == 3
    for x, y in zip(seen["a"], seen["b"]):
        for u, v in zip(x, y): close(u, v)
    close(a, b)

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(mask_image=square(32, 32)), ValueError, "mask_image is 32x32 (HxW) but image is 64x64"),
    (dict(mask_image=None), ValueError, "inpainting needs both image and mask_image"),
    (dict(image=None), ValueError, "inpainting needs both image and mask_image"),
    (dict(strength=2), ValueError, "strength must be a number in [0, 1], got 2"),
    (dict(strength=0.1, num_inference_steps=5), ValueError, "runs no denoising step"),
    (dict(image={"not": "a picture"}), TypeError, "image must be a PIL image, a float array"),
    (dict(mask_image="mask.png"), TypeError, "mask_image must be a PIL image"),
    (dict(mask_image=np.zeros((64, 64, 3), np.float32)), ValueError, "mask_image must be grayscale"),
    (dict(image=torch.zeros(1, 4, 64, 64)), ValueError, "image must be a picture (3 channels)"),
    (dict(image=torch.zeros(3, 3, 64, 64)), ValueError, "got 3 images for 2 images to make"),
    (dict(height=60), ValueError, "height must be a positive multiple of the VAE factor 8"),
    (dict(latents=torch.zeros(2, 9, 8, 8)), ValueError, "latents must have shape (2, 4, 8, 8)"),
])
def test_bad_inputs_have_clear_errors(sd9, kwargs, err, msg):
    pipe = ours(sd9)
    call = {"prompt": "a cat", "image": picture(), "mask_image": square(), "num_inference_steps": 4,
            "num_images_per_prompt": 2, **kwargs}
    with pytest.raises(err) as e: pipe(**call)
    assert msg in str(e.value)
    assert pipe("a cat", image=picture(), mask_image=square(), num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)

def test_unet_with_other_channels_is_refused(sd4):
    pipe = ours(sd4)
    pipe.unet.register_to_config(in_channels=5)
    with pytest.raises(ValueError, match="must be 4 .* or 9"): pipe("a cat", image=picture(), mask_image=square())
