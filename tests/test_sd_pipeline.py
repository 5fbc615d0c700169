"StableDiffusionPipeline: the tutorial's SD code unchanged, parity with diffusers, bad calls, swaps and dtypes."
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pytest, torch
import minidiff
from minidiff import (StableDiffusionPipeline, UniPCMultistepScheduler, DDIMScheduler, EulerAncestralDiscreteScheduler,
                      AutoencoderKL, save_tiny_sd)

SHA = "2880f2ca379f41b0226444936bb7a6766a227587"
REAL = Path(__file__).parents[1]/"nbs"/"configs"/"runwayml_stable-diffusion-v1-5"

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

def reference(folder):
    import diffusers
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref

def ours(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder); pipe.set_progress_bar_config(disable=True)
    return pipe

def gens(n, start=0): return [torch.Generator().manual_seed(start + i) for i in range(n)]

@pytest.mark.parametrize("scheduler", ["UniPCMultistepScheduler", "PNDMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_images_match_diffusers(sd, scheduler):
    import diffusers
    a_pipe, b_pipe = ours(sd), reference(sd)
    a_pipe.scheduler = getattr(minidiff, scheduler).from_config(a_pipe.scheduler.config)
    b_pipe.scheduler = getattr(diffusers, scheduler).from_config(b_pipe.scheduler.config)
    kw = dict(prompt=["a photograph of an astronaut riding a horse", "a red cat"], negative_prompt=["blurry", ""],
              num_images_per_prompt=2, num_inference_steps=25 if scheduler == "UniPCMultistepScheduler" else 5,
              guidance_scale=7.5, output_type="np", eta=0.5)
    a = a_pipe(**kw, generator=gens(4)).images
    b = b_pipe(**kw, generator=gens(4)).images
    assert a.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

def test_single_generator_latents_and_no_guidance_match(sd):
    a_pipe, b_pipe = ours(sd), reference(sd)
    for kw in (dict(guidance_scale=1.0), dict(guidance_scale=0.5), dict(guidance_scale=3.0, output_type="latent")):
        kw = {"prompt": "a red cat", "num_inference_steps": 4, "output_type": "np", **kw}
        a = a_pipe(**kw, generator=torch.Generator().manual_seed(7)).images
        b = b_pipe(**kw, generator=torch.Generator().manual_seed(7)).images
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = a_pipe("a cat", latents=lat, num_inference_steps=3, output_type="pt").images
    b = b_pipe("a cat", latents=lat, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

def test_guidance_scale_one_runs_one_unet_pass(sd):
    pipe, calls = ours(sd), []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pipe("a cat", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    pipe("a cat", num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    n = len(pipe.scheduler.timesteps)   # PNDM: 3 timesteps for 2 steps
    assert calls == [1] * n + [2] * n

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(height=60), ValueError, "height must be a positive multiple of the VAE factor 8"),
    (dict(width=-8), ValueError, "width"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(prompt=["a", "b"], generator=[torch.Generator()]), ValueError, "1 generators for 2 images"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError, "negative_prompt must be one prompt or one per prompt: got 3 negative prompts for 2 prompts"),
    (dict(prompt=42), TypeError, "prompt must be a string or a list of strings"),
    (dict(prompt=["a", 3]), TypeError, "prompt must be a string"),
    (dict(negative_prompt=5), TypeError, "negative_prompt"),
    (dict(output_type="jpeg"), ValueError, "output_type"),
    (dict(latents=torch.zeros(1, 4, 9, 9)), ValueError, "latents must have shape (1, 4, 8, 8)"),
])
def test_bad_calls_leave_the_pipeline_usable(sd, kwargs, err, msg):
    pipe = ours(sd)
    with pytest.raises(err, match=msg.replace("(", r"\(").replace(")", r"\)")): pipe(**{"prompt": "a cat", "num_inference_steps": 2, **kwargs})
    assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)

def test_swaps_dtype_and_save(sd, tmp_path):
    pipe = ours(sd)
    assert UniPCMultistepScheduler in pipe.scheduler.compatibles and DDIMScheduler in pipe.scheduler.compatibles
    pipe.vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    pipe.to(torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe("a cat", num_inference_steps=2, output_type="pt").images.dtype == torch.bfloat16
    pipe.to(torch.float32).save_pretrained(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert json.loads((tmp_path/"model_index.json").read_text())["tokenizer"] == ["transformers", "CLIPTokenizer"]

def test_attention_slicing_gives_the_same_images(sd):
    pipe = ours(sd)
    a = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.enable_attention_slicing(); pipe.enable_vae_slicing()
    b = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.disable_attention_slicing(); pipe.disable_vae_slicing()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

def test_fp16_variant_and_torch_dtype(sd, tmp_path):
    folder = tmp_path/"sd"; shutil.copytree(sd, folder)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        from safetensors.torch import load_file, save_file
        sd16 = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(folder/part/f"{name}.safetensors")).items()}
        save_file(sd16, str(folder/part/f"{name}.fp16.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16

def fake_hub_cache(root, folder, repo_id):
    repo = Path(root)/("models--" + repo_id.replace("/", "--"))
    (repo/"refs").mkdir(parents=True); (repo/"refs"/"main").write_text(SHA)
    shutil.copytree(folder, repo/"snapshots"/SHA)
    return Path(root)

TUTORIAL = '''
from PIL import Image
import torch
{imports}
vae = AutoencoderKL.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="vae", use_safetensors=True)
tokenizer = CLIPTokenizer.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="text_encoder", use_safetensors=True)
unet = UNet2DConditionModel.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="unet", use_safetensors=True)
scheduler = UniPCMultistepScheduler.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="scheduler")
torch_device = "cpu"
vae.to(torch_device)
text_encoder.to(torch_device)
unet.to(torch_device)
prompt = ["a photograph of an astronaut riding a horse"]
height = {size}  # default height of Stable Diffusion
width = {size}  # default width of Stable Diffusion
num_inference_steps = 25  # Number of denoising steps
guidance_scale = 7.5  # Scale for classifier-free guidance
generator = torch.manual_seed(0)  # Seed generator to create the initial latent noise
batch_size = len(prompt)
text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
with torch.no_grad():
    text_embeddings = text_encoder(text_input.input_ids.to(torch_device))[0]
max_length = text_input.input_ids.shape[-1]
uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]
text_embeddings = torch.cat([uncond_embeddings, text_embeddings])
latents = torch.randn((batch_size, unet.config.in_channels, height // 8, width // 8), generator=generator, device=torch_device)
latents = latents * scheduler.init_noise_sigma
from tqdm.auto import tqdm
scheduler.set_timesteps(num_inference_steps)
for t in tqdm(scheduler.timesteps):
    latent_model_input = torch.cat([latents] * 2)
    latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)
    with torch.no_grad():
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    latents = scheduler.step(noise_pred, t, latents).prev_sample
latents = 1 / 0.18215 * latents
with torch.no_grad():
    image = vae.decode(latents).sample
image = (image / 2 + 0.5).clamp(0, 1).squeeze()
image = (image.permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()
image = Image.fromarray(image)
image.save({out!r})
'''
REF_IMPORTS = ("from transformers import CLIPTextModel, CLIPTokenizer\n"
               "from diffusers import AutoencoderKL, UNet2DConditionModel, PNDMScheduler\n"
               "from diffusers import UniPCMultistepScheduler")
OUR_IMPORTS = ("from minidiff import CLIPTextModel, CLIPTokenizer\n"
               "from minidiff import AutoencoderKL, UNet2DConditionModel, PNDMScheduler\n"
               "from minidiff import UniPCMultistepScheduler")

def test_tutorial_sd_code_unchanged(sd, tmp_path):
    "The Stable Diffusion section of the diffusers tutorial (Understanding pipelines, models and schedulers), imports changed (and cuda -> cpu, 64 px for the tiny model), same image."
    env = {**os.environ, "HF_HUB_CACHE": str(fake_hub_cache(tmp_path/"cache", sd, "CompVis/stable-diffusion-v1-4")),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    images = []
    for name, imports in (("ref", REF_IMPORTS), ("ours", OUR_IMPORTS)):
        out = tmp_path/f"{name}.png"
        subprocess.run([sys.executable, "-c", TUTORIAL.format(imports=imports, size=64, out=str(out))], check=True, env=env)
        images.append(np.asarray(__import__("PIL.Image").Image.open(out)).astype(int))
    assert images[0].shape == (64, 64, 3)
    assert np.abs(images[0] - images[1]).max() <= 1   # uint8 truncation of float values within 1e-4

@pytest.mark.slow
def test_full_size_sd15_configs_match_diffusers(tmp_path):
    "The real SD v1.5 configs, seeded random weights: one guided step at 512x512, ours vs diffusers."
    import diffusers, transformers
    torch.manual_seed(0)
    folder = save_tiny_sd(tmp_path/"small")
    for part, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        shutil.rmtree(folder/part)
        cls.from_config(json.loads((REAL/part/"config.json").read_text())).save_pretrained(folder/part)
    shutil.rmtree(folder/"text_encoder")
    transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(REAL/"text_encoder")).save_pretrained(folder/"text_encoder")
    a_pipe, b_pipe = ours(folder), reference(folder)
    a_pipe.scheduler = UniPCMultistepScheduler.from_config(a_pipe.scheduler.config)
    b_pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(b_pipe.scheduler.config)
    kw = dict(prompt="a photograph of an astronaut riding a horse", num_inference_steps=2, output_type="np")
    a = a_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    b = b_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 512, 512, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
