"DDPMPipeline: parity with diffusers, the tutorial's DDPM code unchanged, the CLI, and bad calls."
import json, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from safetensors.torch import load_file, save_file
import minidiff
from minidiff import DDPMPipeline, DDPMScheduler, UNet2DModel
from minidiff.loading import to_legacy_keys

REF = Path(__file__).parents[1]/"nbs"/"configs"/"google_ddpm-cat-256"
SHA = "82ca0d5db4a5ec6ff0e9be8d86852490bc18a3d9"
# google/ddpm-cat-256's config, shrunk to 64x64 pixels and narrow channels (the same model notebook 06 builds)
SMALL = {**json.loads((REF/"config.json").read_text()), "sample_size": 64, "block_out_channels": [32, 32, 64, 64, 64, 64]}

def write_cat_folder(folder, config, seed=0):
    "A google/ddpm-cat-256-style flat folder: diffusers-written weights renamed to the 2022 legacy attention names."
    import diffusers
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel.from_config(config)
    ref.save_pretrained(folder)
    f = Path(folder)/"diffusion_pytorch_model.safetensors"
    save_file(to_legacy_keys(load_file(str(f))), str(f), metadata={"format": "pt"})
    (Path(folder)/"config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(REF/"scheduler_config.json", Path(folder)/"scheduler_config.json")
    shutil.copy(REF/"model_index.json", Path(folder)/"model_index.json")
    return Path(folder)

@pytest.fixture(scope="module")
def small_cat(tmp_path_factory):
    return write_cat_folder(tmp_path_factory.mktemp("cat"), SMALL)

def test_pipeline_matches_diffusers(small_cat):
    import diffusers
    ours = DDPMPipeline.from_pretrained(small_cat); ours.set_progress_bar_config(disable=True)
    ref = diffusers.DDPMPipeline.from_pretrained(small_cat); ref.set_progress_bar_config(disable=True)
    for steps, batch in [(5, 1), (10, 2)]:
        a = ours(batch_size=batch, generator=torch.Generator().manual_seed(1), num_inference_steps=steps, output_type="np").images
        b = ref(batch_size=batch, generator=torch.Generator().manual_seed(1), num_inference_steps=steps, output_type="np").images
        assert a.shape == b.shape == (batch, 64, 64, 3)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)

def test_generator_list_per_image(small_cat):
    pipe = DDPMPipeline.from_pretrained(small_cat); pipe.set_progress_bar_config(disable=True)
    two = pipe(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], num_inference_steps=3, output_type="np").images
    one = pipe(batch_size=1, generator=[torch.Generator().manual_seed(4)], num_inference_steps=3, output_type="np").images
    np.testing.assert_allclose(two[1], one[0], atol=1e-4)  # batched vs single convolutions differ by float32 rounding

def test_loaded_via_diffusion_pipeline_and_flat_layout(small_cat):
    pipe = minidiff.DiffusionPipeline.from_pretrained(small_cat)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.clip_sample is True

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(batch_size=0), ValueError, "batch_size"), (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(output_type="jpg"), ValueError, "output_type"),
    (dict(batch_size=2, generator=[torch.Generator()]), ValueError, "1 generators for 2 images"),
    (dict(generator=3), TypeError, "generator")])
def test_bad_calls_then_pipeline_still_works(small_cat, kwargs, err, msg):
    pipe = DDPMPipeline.from_pretrained(small_cat); pipe.set_progress_bar_config(disable=True)
    with pytest.raises(err, match=msg): pipe(**{"num_inference_steps": 2, **kwargs})
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)

def test_output_types(small_cat):
    pipe = DDPMPipeline.from_pretrained(small_cat); pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=1).images[0].size == (64, 64)
    assert pipe(num_inference_steps=1, output_type="pt").images.shape == (1, 3, 64, 64)
    assert isinstance(pipe(num_inference_steps=1, return_dict=False), tuple)

def test_save_pretrained_round_trip(small_cat, tmp_path):
    pipe = DDPMPipeline.from_pretrained(small_cat)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path/"model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    again = DDPMPipeline.from_pretrained(tmp_path)
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)

def fake_hub_cache(root, folder, repo_id="google/ddpm-cat-256"):
    repo = Path(root)/("models--" + repo_id.replace("/", "--"))
    (repo/"refs").mkdir(parents=True); (repo/"refs"/"main").write_text(SHA)
    shutil.copytree(folder, repo/"snapshots"/SHA)
    return root

@pytest.mark.parametrize("config", ["small", pytest.param("real", marks=pytest.mark.slow)])
def test_tutorial_ddpm_code_unchanged(tmp_path, monkeypatch, config):
    """The diffusers tutorial's DDPM code (Understanding pipelines, models and schedulers), only its import changed
    (and cuda -> cpu), from a Hub cache laid out like google/ddpm-cat-256."""
    cfg = SMALL if config == "small" else json.loads((REF/"config.json").read_text())
    folder = write_cat_folder(tmp_path/"repo", cfg)
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path/"cache", folder)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = '''
from minidiff import DDPMScheduler, UNet2DModel
import torch
from PIL import Image
scheduler = DDPMScheduler.from_pretrained("google/ddpm-cat-256")
model = UNet2DModel.from_pretrained("google/ddpm-cat-256").to("cpu")
scheduler.set_timesteps(50)
assert scheduler.timesteps[:3].tolist() == [980, 960, 940] and scheduler.timesteps[-1] == 0
sample_size = model.config.sample_size
noise = torch.randn((1, 3, sample_size, sample_size), device="cpu")
input = noise
for t in scheduler.timesteps:
    with torch.no_grad():
        noisy_residual = model(input, t).sample
    previous_noisy_sample = scheduler.step(noisy_residual, t, input).prev_sample
    input = previous_noisy_sample
image = (input / 2 + 0.5).clamp(0, 1).squeeze()
image = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
image = Image.fromarray(image)
assert image.size == (sample_size, sample_size)
'''
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ})
