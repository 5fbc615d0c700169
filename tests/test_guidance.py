"classifier_free_guidance: the identities, bad input, and the hand-written SD loop against both pipelines."
import numpy as np, pytest, torch
import minidiff
from minidiff.guidance import classifier_free_guidance
from minidiff.latents import prepare_latents, vae_scale_factor
from minidiff.tiny_sd import save_tiny_sd

def pair(b=2, seed=0, dtype=torch.float32):
    u, t = torch.randn(2, b, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return u, t, torch.cat([u, t])

@pytest.mark.parametrize("b", [1, 3])
def test_identities(b):
    u, t, noise_pred = pair(b)
    assert torch.equal(classifier_free_guidance(noise_pred, 0.0), u)                            # exact
    torch.testing.assert_close(classifier_free_guidance(noise_pred, 1.0), t, rtol=0, atol=1e-6)  # one rounding
    for s in (0.5, 3.0, 7.5, 15.0, -1.0):
        out = classifier_free_guidance(noise_pred, s)
        assert out.shape == (b, 4, 8, 8)
        assert torch.equal(out, u + s * (t - u))                                                 # diffusers' expression
        torch.testing.assert_close(out, s * t - (s - 1) * u, rtol=1e-5, atol=1e-5)              # (1 + w) t - w u

def test_linear_in_the_scale_and_keeps_dtype_and_device():
    u, t, noise_pred = pair(2, seed=1)
    a, b = classifier_free_guidance(noise_pred, 2.0), classifier_free_guidance(noise_pred, 4.0)
    torch.testing.assert_close(b - a, 2.0 * (t - u), rtol=1e-5, atol=1e-5)
    half = classifier_free_guidance(pair(2, dtype=torch.float16)[2], 7.5)
    assert half.dtype == torch.float16
    assert classifier_free_guidance(torch.zeros(4, 4, 8, 8, device="meta"), 7.5).device.type == "meta"
    assert torch.equal(classifier_free_guidance(noise_pred, torch.tensor(7.5)), classifier_free_guidance(noise_pred, 7.5))

@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (1, 4, 8, 8), ()])
def test_refuses_what_is_not_a_doubled_batch(shape):
    with pytest.raises(ValueError, match=r"noise_pred must be a doubled batch \[uncond, text\] \(even first dimension\), got shape"):
        classifier_free_guidance(torch.zeros(shape), 7.5)

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

def hand_loop(folder, scheduler, prompts, generator, steps, guidance_scale, size=64):
    "The diffusers tutorial's loop (Understanding pipelines, models and schedulers) with minidiff's parts, prepare_latents and classifier_free_guidance; (B, H, W, 3) in [0, 1]."
    tok = minidiff.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = minidiff.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    unet = minidiff.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = minidiff.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    ids = [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
           for p in ([""] * len(prompts), prompts)]
    f = vae_scale_factor(vae.config)
    with torch.no_grad():
        emb = torch.cat([te(i)[0] for i in ids])
        scheduler.set_timesteps(steps)
        latents = prepare_latents(scheduler, (len(prompts), unet.config.in_channels, size // f, size // f), generator, dtype=emb.dtype)
        for t in scheduler.timesteps:
            noise_pred = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, encoder_hidden_states=emb).sample
            latents = scheduler.step(classifier_free_guidance(noise_pred, guidance_scale), t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

@pytest.mark.parametrize("name,steps", [("UniPCMultistepScheduler", 8), ("EulerDiscreteScheduler", 5), ("DDIMScheduler", 5)])
def test_hand_loop_matches_both_pipelines(sd, name, steps):
    import diffusers
    prompts, kw = ["a photograph of an astronaut riding a horse", "a red cat"], dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    cfg = minidiff.PNDMScheduler.from_pretrained(sd, subfolder="scheduler").config
    mine = hand_loop(sd, getattr(minidiff, name).from_config(cfg), prompts, gens(), steps, 7.5)
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(sd); pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(minidiff, name).from_config(cfg)
    np.testing.assert_allclose(pipe(prompts, generator=gens(), **kw).images, mine, rtol=0, atol=0)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
    np.testing.assert_allclose(ref(prompts, generator=gens(), **kw).images, mine, rtol=0, atol=1e-5)

def test_scale_one_loop_matches_the_unguided_pipeline(sd):
    cfg = minidiff.PNDMScheduler.from_pretrained(sd, subfolder="scheduler").config
    mine = hand_loop(sd, minidiff.UniPCMultistepScheduler.from_config(cfg), ["a red cat"], torch.Generator().manual_seed(3), 6, 1.0)
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(sd); pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = minidiff.UniPCMultistepScheduler.from_config(cfg)
    out = pipe(["a red cat"], num_inference_steps=6, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(out, mine, rtol=0, atol=1e-5)
