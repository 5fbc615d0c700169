"""DDIMPipeline: parity with diffusers' DDIMPipeline (eta, use_clipped_model_output, batches, generator lists), the
google/ddpm-cifar10-32 layout, DDPMPipeline with a DDIMScheduler swapped in, the tutorial's code, and bad calls."""
import json, logging, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from minidiff import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from minidiff.ddim_pipeline import CIFAR10_UNET, CIFAR10_SCHEDULER, save_tiny_ddpm

REF = Path(__file__).parents[1]/"nbs"/"configs"/"google_ddpm-cifar10-32"
SHA = "0000000000000000000000000000000000000000"

@pytest.fixture(scope="module")
def tiny(tmp_path_factory): return save_tiny_ddpm(tmp_path_factory.mktemp("cifar"))

def pipes(folder):
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    ours, ref = DDIMPipeline.from_pretrained(folder), diffusers.DDIMPipeline.from_pretrained(folder)
    for p in (ours, ref): p.set_progress_bar_config(disable=True)
    return ours, ref

def gens(kind, n):
    if kind == "one": return torch.Generator().manual_seed(7)
    if kind == "global": return torch.manual_seed(7)
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]

def linf(a, b):
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())

def test_constants_are_the_real_config():
    real = json.loads((REF/"config.json").read_text()); sched = json.loads((REF/"scheduler_config.json").read_text())
    assert {k: v for k, v in real.items() if not k.startswith("_")} == CIFAR10_UNET
    assert {k: v for k, v in sched.items() if not k.startswith("_")} == CIFAR10_SCHEDULER
    assert json.loads((REF/"model_index.json").read_text())["_class_name"] == "DDPMPipeline"

def test_tiny_folder_layout(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                      "model_index.json", "scheduler_config.json"]
    assert json.loads((tiny/"scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"

@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("clipped", [None, False, True])
@pytest.mark.parametrize("kind,n", [("one", 1), ("list", 3), ("one", 2), ("global", 2)])
def test_matches_diffusers(tiny, eta, clipped, kind, n):
    ours, ref = pipes(tiny)
    kw = dict(batch_size=n, eta=eta, use_clipped_model_output=clipped, num_inference_steps=8, output_type="np")
    a, b = ours(generator=gens(kind, n), **kw).images, ref(generator=gens(kind, n), **kw).images
    assert a.shape == b.shape == (n, 32, 32, 3)
    assert linf(a, b) <= 1e-4

def test_options_change_the_image(tiny):
    "The parity sweep is not vacuous: eta and use_clipped_model_output both change the picture here."
    ours, _ = pipes(tiny)
    def run(**kw): return ours(generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="np",
                               **kw).images
    base = run()
    assert linf(run(eta=1.0), base) > 0.1 and linf(run(use_clipped_model_output=True), base) > 0.1
    assert np.array_equal(run(use_clipped_model_output=False), base)

def test_default_steps_and_output_types(tiny):
    ours, ref = pipes(tiny)
    a = ours(generator=torch.Generator().manual_seed(0)).images
    b = ref(generator=torch.Generator().manual_seed(0)).images
    assert len(a) == 1 and a[0].size == (32, 32) and ours.scheduler.num_inference_steps == 50
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    pt = ours(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    assert isinstance(ours(num_inference_steps=1, return_dict=False), tuple)

def test_scheduler_converted_like_diffusers(tiny):
    ours, ref = pipes(tiny)
    assert type(ours.scheduler) is DDIMScheduler and type(ref.scheduler).__name__ == "DDIMScheduler"
    for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample", "set_alpha_to_one",
              "steps_offset", "prediction_type", "timestep_spacing"):
        assert ours.scheduler.config[k] == ref.scheduler.config[k], k
    direct = DDIMPipeline(unet=ours.unet, scheduler=DDPMScheduler(**CIFAR10_SCHEDULER))
    assert type(direct.scheduler) is DDIMScheduler and direct.scheduler.config.clip_sample is True
    assert type(DiffusionPipeline.from_pretrained(tiny)) is DDPMPipeline   # model_index.json names DDPMPipeline

@pytest.mark.parametrize("kind,n", [("one", 1), ("list", 2)])
def test_ddpm_pipeline_with_ddim_swapped_in(tiny, kind, n):
    "diffusers' scheduler swap on DDPMPipeline: DDIM with eta 0, equal to diffusers' and to DDIMPipeline(eta=0)."
    import diffusers
    ours = DDPMPipeline.from_pretrained(tiny); ref = diffusers.DDPMPipeline.from_pretrained(tiny)
    ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    for p in (ours, ref): p.set_progress_bar_config(disable=True)
    kw = dict(batch_size=n, num_inference_steps=6, output_type="np")
    a, b = ours(generator=gens(kind, n), **kw).images, ref(generator=gens(kind, n), **kw).images
    assert linf(a, b) <= 1e-4
    ddim, _ = pipes(tiny)
    assert np.array_equal(a, ddim(generator=gens(kind, n), eta=0.0, **kw).images)

def test_save_pretrained_round_trip_loads_in_diffusers(tiny, tmp_path):
    import diffusers
    ours, _ = pipes(tiny)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path/"model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    again = DDIMPipeline.from_pretrained(tmp_path); again.set_progress_bar_config(disable=True)
    theirs = diffusers.DDIMPipeline.from_pretrained(tmp_path); theirs.set_progress_bar_config(disable=True)
    a = again(generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np").images
    b = theirs(generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np").images
    c = ours(generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np").images
    # the same weights read from another file sit at other memory offsets, so float32 kernels may round differently
    # (diffusers' own UNet shows the same 1e-6 between the two folders): equal within 1e-4, not bit for bit
    assert linf(a, b) <= 1e-4 and linf(a, c) <= 1e-4

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(batch_size=0), ValueError, "batch_size"), (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(output_type="jpg"), ValueError, "output_type"),
    (dict(batch_size=2, generator=[torch.Generator()]), ValueError, "1 generators for 2 images"),
    (dict(generator="seed"), TypeError, "generator")])
def test_bad_calls_then_pipeline_still_works(tiny, kwargs, err, msg):
    ours, _ = pipes(tiny)
    with pytest.raises(err, match=msg): ours(**{"num_inference_steps": 2, **kwargs})
    assert ours(num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)

def test_eta_out_of_range_warns(tiny, caplog):
    ours, _ = pipes(tiny)
    with caplog.at_level(logging.WARNING, logger="minidiff.ddim_pipeline"):
        ours(num_inference_steps=2, eta=1.5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert "eta should be in [0, 1]" in caplog.text   # as diffusers: a warning, not an error

def fake_hub_cache(root, folder, repo_id="google/ddpm-cifar10-32"):
    repo = Path(root)/("models--" + repo_id.replace("/", "--"))
    (repo/"refs").mkdir(parents=True); (repo/"refs"/"main").write_text(SHA)
    shutil.copytree(folder, repo/"snapshots"/SHA)
    return root

TUTORIAL = '''
from {lib} import DDIMPipeline
import numpy as np
import torch

model_id = "google/ddpm-cifar10-32"
ddim = DDIMPipeline.from_pretrained(model_id)
ddim.set_progress_bar_config(disable=True)
image = ddim(num_inference_steps=2, output_type="np").images
assert np.isfinite(image).all() and image.shape == (1, 32, 32, 3)
generator = torch.Generator(device="cpu").manual_seed(0)
image = ddim(num_inference_steps=2, output_type="np", generator=generator).images
print(repr(float(np.abs(image).sum())))
'''

def test_tutorial_code_unchanged(tiny, tmp_path):
    "The Reproducible pipelines tutorial's DDIM cells, only the import changed, from a Hub cache like the repo's."
    cache = fake_hub_cache(tmp_path/"cache", tiny)
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    sums = [subprocess.run([sys.executable, "-c", TUTORIAL.format(lib=lib)], check=True, env=env, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1] for lib in ("minidiff", "diffusers")]
    assert sums[0] == sums[1]

@pytest.mark.slow
def test_full_config_matches_diffusers(tmp_path):
    "The real google/ddpm-cifar10-32 widths (random weights): every option, against diffusers."
    folder = save_tiny_ddpm(tmp_path, block_out_channels=CIFAR10_UNET["block_out_channels"])
    ours, ref = pipes(folder)
    assert sum(p.numel() for p in ours.unet.parameters()) == sum(p.numel() for p in ref.unet.parameters())
    for eta, clipped, kind, n in ((0.0, None, "one", 1), (1.0, True, "list", 2)):
        kw = dict(batch_size=n, eta=eta, use_clipped_model_output=clipped, num_inference_steps=5, output_type="np")
        assert linf(ours(generator=gens(kind, n), **kw).images, ref(generator=gens(kind, n), **kw).images) <= 1e-4
