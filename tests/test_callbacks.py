"Step-end callbacks, interrupt, prompt_embeds, guidance_rescale, the per-call LoRA scale and the memory switches, against diffusers."
import numpy as np, pytest, torch
import minidiff
from minidiff import StableDiffusionPipeline, save_tiny_sd
from minidiff.sd_pipeline import rescale_noise_cfg

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

def pipes(folder, scheduler="UniPCMultistepScheduler"):
    import diffusers
    a = StableDiffusionPipeline.from_pretrained(folder)
    b = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    for p, lib in ((a, minidiff), (b, diffusers)):
        p.set_progress_bar_config(disable=True); p.scheduler = getattr(lib, scheduler).from_config(p.scheduler.config)
    return a, b

def g(seed=0): return torch.Generator().manual_seed(seed)

def close(a, b, atol=1e-4):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    return float(np.abs(a - b).max())

def recorder(store, names=("latents",), stop_at=None, change=None):
    def cb(pipe, step, t, kwargs):
        store.append((step, int(t), {k: v.clone() for k, v in kwargs.items()}))
        if step == stop_at: pipe._interrupt = True
        if change is not None: kwargs = {**kwargs, "latents": change(kwargs["latents"])}
        return kwargs
    return cb

@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_recorded_tensors_equal_diffusers(sd, scheduler):
    a_pipe, b_pipe = pipes(sd, scheduler)
    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    sa, sb = [], []
    kw = dict(prompt=["a red cat", "a dog"], negative_prompt=["blurry", ""], num_inference_steps=6, output_type="np",
              num_images_per_prompt=2, callback_on_step_end_tensor_inputs=names)
    a = a_pipe(**kw, generator=[g(i) for i in range(4)], callback_on_step_end=recorder(sa)).images
    b = b_pipe(**kw, generator=[g(i) for i in range(4)], callback_on_step_end=recorder(sb)).images
    assert [s[:2] for s in sa] == [s[:2] for s in sb] and len(sa) == len(b_pipe.scheduler.timesteps)
    for (_, _, x), (_, _, y) in zip(sa, sb):
        assert x.keys() == y.keys() == set(names)
        for k in names: close(x[k], y[k])
    close(a, b)
    assert a_pipe.num_timesteps == b_pipe.num_timesteps

@pytest.mark.parametrize("stop_at", [0, 3])
def test_interrupt_stops_both_at_the_same_step(sd, stop_at):
    a_pipe, b_pipe = pipes(sd)
    sa, sb = [], []
    kw = dict(prompt="a cat", num_inference_steps=8, output_type="latent")
    a = a_pipe(**kw, generator=g(), callback_on_step_end=recorder(sa, stop_at=stop_at)).images
    b = b_pipe(**kw, generator=g(), callback_on_step_end=recorder(sb, stop_at=stop_at)).images
    assert len(sa) == len(sb) == stop_at + 1 and a_pipe.interrupt and b_pipe.interrupt
    close(a, sa[-1][2]["latents"], atol=0); close(a, b)
    assert a_pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)   # reset per call

def test_callback_can_change_the_latents(sd):
    a_pipe, b_pipe = pipes(sd, "DDIMScheduler")
    half = lambda x: x * 0.5
    kw = dict(prompt="a cat", num_inference_steps=5, output_type="np")
    a = a_pipe(**kw, generator=g(), callback_on_step_end=recorder([], change=half)).images
    b = b_pipe(**kw, generator=g(), callback_on_step_end=recorder([], change=half)).images
    plain = a_pipe(**kw, generator=g()).images
    close(a, b); assert np.abs(a - plain).max() > 1e-3

def test_noise_pred_is_offered_and_gives_the_x0_prediction(sd):
    "minidiff's extra callback tensor: the guided noise prediction of the step (diffusers does not offer it)."
    pipe, _ = pipes(sd, "DDIMScheduler")
    seen, start = [], torch.randn(1, 4, 8, 8, generator=g(1))
    pipe("a cat", num_inference_steps=4, latents=start, output_type="latent",
         callback_on_step_end=recorder(seen), callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    s = pipe.scheduler
    x_t, t = start, s.timesteps[0]
    eps = seen[0][2]["noise_pred"]
    abar, abar_prev = s.alphas_cumprod[t], s.alphas_cumprod[t - 1000 // 4]
    x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    close(seen[0][2]["latents"], abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps, atol=1e-5)   # DDIM, eta 0

def test_diffusers_pipeline_callback_object_works(sd):
    "diffusers' SDCFGCutoffCallback (a PipelineCallback: its own tensor_inputs, sets pipe._guidance_scale) runs on ours."
    from diffusers.callbacks import SDCFGCutoffCallback
    a_pipe, b_pipe = pipes(sd)
    kw = dict(prompt="a cat", num_inference_steps=10, output_type="np", guidance_scale=9.0)
    a = a_pipe(**kw, generator=g(), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4)).images
    b = b_pipe(**kw, generator=g(), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4)).images
    assert a_pipe.guidance_scale == 0.0
    close(a, b); assert np.abs(a - a_pipe(**kw, generator=g()).images).max() > 1e-4

def test_prompt_embeds_match_diffusers(sd):
    a_pipe, b_pipe = pipes(sd)
    with torch.no_grad():
        emb, neg = b_pipe.encode_prompt(["a red cat", "a dog"], "cpu", 1, True, ["blurry", "ugly"])
        ours_emb, ours_neg = a_pipe.encode_prompt(["a red cat", "a dog"], "cpu", 1, True, ["blurry", "ugly"])
    close(emb, ours_emb, atol=1e-5); close(neg, ours_neg, atol=1e-5)
    for kw in (dict(prompt_embeds=emb, negative_prompt_embeds=neg), dict(prompt_embeds=emb),
               dict(prompt_embeds=emb, negative_prompt=["blurry", "x"]), dict(prompt_embeds=emb, guidance_scale=1.0)):
        kw = dict(num_inference_steps=4, output_type="np", num_images_per_prompt=2, **kw)
        close(a_pipe(**kw, generator=[g(i) for i in range(4)]).images, b_pipe(**kw, generator=[g(i) for i in range(4)]).images)
    text = a_pipe(["a red cat", "a dog"], negative_prompt=["blurry", "ugly"], num_inference_steps=4, output_type="np", generator=g()).images
    close(text, a_pipe(prompt_embeds=ours_emb, negative_prompt_embeds=ours_neg, num_inference_steps=4, output_type="np",
                       generator=g()).images, atol=0)

@pytest.mark.parametrize("rescale", [0.0, 0.5, 1.0])
def test_guidance_rescale_matches_diffusers(sd, rescale):
    a_pipe, b_pipe = pipes(sd)
    kw = dict(prompt="a cat", guidance_scale=15.0, guidance_rescale=rescale, num_inference_steps=5, output_type="np")
    close(a_pipe(**kw, generator=g()).images, b_pipe(**kw, generator=g()).images)

def test_rescale_noise_cfg_equals_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref
    x, y = torch.randn(3, 4, 8, 8, generator=g()), 4 * torch.randn(3, 4, 8, 8, generator=g(1))
    for phi in (0.0, 0.7, 1.0): assert torch.equal(rescale_noise_cfg(y, x, phi), ref(y, x, phi))

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(prompt=None), ValueError, "pass exactly one of prompt and prompt_embeds, got neither"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "pass exactly one of prompt and prompt_embeds, got both"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), ValueError, "prompt_embeds must be a (B, L, D) tensor"),
    (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "at most one of negative_prompt"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32)), ValueError,
     "must have the same shape"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["mask"]), ValueError,
     "callback_on_step_end_tensor_inputs must be among"),
    (dict(callback_on_step_end="not a function"), TypeError, "callback_on_step_end must be callable"),
])
def test_bad_calls(sd, kwargs, err, msg):
    pipe, _ = pipes(sd)
    with pytest.raises(err) as e: pipe(**{"prompt": "a cat", "num_inference_steps": 2, **kwargs})
    assert msg in str(e.value)

def test_non_finite_latents_name_the_step(sd):
    pipe, _ = pipes(sd)
    calls = []
    def poison(module, inputs, output):
        calls.append(1)
        if len(calls) == 3: output.sample[:] = float("nan")
    h = pipe.unet.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"^latents became NaN/inf at step 2 in torch.float32: run the model in float32 or bfloat16"):
        pipe("a cat", num_inference_steps=5, output_type="np")
    h.remove()
    assert np.isfinite(pipe("a cat", num_inference_steps=2, output_type="np").images).all()

def test_lora_scale_at_call_time_matches_diffusers_peft(sd, tmp_path):
    pytest.importorskip("peft")
    from test_lora import kohya_file
    a_pipe, b_pipe = pipes(sd)
    f = kohya_file(a_pipe, tmp_path/"l.safetensors")
    a_pipe.load_lora_weights(f); b_pipe.load_lora_weights(str(f))
    kw = dict(prompt="a red cat", num_inference_steps=3, output_type="np", height=32, width=32)
    half = a_pipe(**kw, generator=g(), cross_attention_kwargs={"scale": 0.5}).images
    close(half, b_pipe(**kw, generator=g(), cross_attention_kwargs={"scale": 0.5}).images)
    full = a_pipe(**kw, generator=g()).images                          # the scale is back to 1 after the call
    close(full, b_pipe(**kw, generator=g()).images)
    assert np.abs(half - full).max() > 1e-3

def test_memory_switches_reach_the_models(sd):
    pipe, _ = pipes(sd)
    calls = []
    class Recorder:
        def __getattr__(self, name): return lambda *a: calls.append((name, *a))
    pipe.unet, pipe.vae = Recorder(), Recorder()
    pipe.enable_attention_slicing(); pipe.enable_attention_slicing(2); pipe.disable_attention_slicing()
    pipe.enable_vae_slicing(); pipe.disable_vae_slicing(); pipe.enable_vae_tiling(); pipe.disable_vae_tiling()
    assert calls == [("set_attention_slice", "auto"), ("set_attention_slice", 2), ("set_attention_slice", None),
                     ("enable_slicing",), ("disable_slicing",), ("enable_tiling",), ("disable_tiling",)]
