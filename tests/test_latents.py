"prepare_latents and vae_scale_factor: real configs, parity with diffusers' prepare_latents, generators, bad input."
import json
from pathlib import Path
import pytest, torch
import minidiff
from minidiff.latents import prepare_latents, vae_scale_factor
from minidiff.tiny_sd import save_tiny_sd

CONFIGS = Path(__file__).parents[1]/"nbs"/"configs"
SCHEDULERS = ["UniPCMultistepScheduler", "PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
              "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]

def gens(n, start=0): return [torch.Generator().manual_seed(start + i) for i in range(n)]

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

@pytest.fixture(scope="module")
def ref(sd):
    import diffusers
    return diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)

def sd_scheduler(name):
    cfg = minidiff.PNDMScheduler.from_pretrained(CONFIGS/"runwayml_stable-diffusion-v1-5", subfolder="scheduler").config
    return getattr(minidiff, name).from_config(cfg)

@pytest.mark.parametrize("path", ["runwayml_stable-diffusion-v1-5/vae/config.json", "CompVis_stable-diffusion-v1-4/vae/config.json",
                                  "stable-diffusion-v1-5_stable-diffusion-v1-5/vae/config.json", "stabilityai_sd-vae-ft-mse/config.json"])
def test_vae_scale_factor_of_real_configs(path):
    cfg = json.loads((CONFIGS/path).read_text())
    assert vae_scale_factor(cfg) == 8
    assert vae_scale_factor(minidiff.AutoencoderKL.from_config(cfg).config) == 8

def test_vae_scale_factor_other_depths():
    assert vae_scale_factor({"block_out_channels": [64]}) == 1
    assert vae_scale_factor({"block_out_channels": [32, 64]}) == 2

@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["one", "list", "latents"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_diffusers_prepare_latents(ref, name, kind, dtype):
    import diffusers
    ours = sd_scheduler(name)
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
    assert float(ours.init_noise_sigma) == float(ref.scheduler.init_noise_sigma)
    shape, dev = (3, 4, 40 // 8, 56 // 8), torch.device("cpu")
    given = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=dtype) if kind == "latents" else None
    make = (lambda: torch.Generator().manual_seed(11)) if kind == "one" else (lambda: gens(3, 20))
    a = prepare_latents(ours, shape, make(), device=dev, dtype=dtype, latents=given)
    b = ref.prepare_latents(3, 4, 40, 56, dtype, dev, make(), latents=given)
    assert a.dtype == b.dtype and a.shape == b.shape == shape
    torch.testing.assert_close(a, b, rtol=0, atol=0)

def test_init_noise_sigma_scales_the_draw():
    unipc, euler = sd_scheduler("UniPCMultistepScheduler"), sd_scheduler("EulerDiscreteScheduler")
    assert unipc.init_noise_sigma == 1.0
    assert float(euler.init_noise_sigma) == pytest.approx(14.6146, abs=1e-4)
    z = prepare_latents(unipc, (2, 4, 8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(prepare_latents(euler, (2, 4, 8, 8), torch.Generator().manual_seed(0)),
                               z * euler.init_noise_sigma, rtol=0, atol=0)
    given = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(prepare_latents(euler, given.shape, latents=given), given * euler.init_noise_sigma, rtol=0, atol=0)

def test_generator_lists_make_images_independent_of_the_batch():
    s = sd_scheduler("PNDMScheduler")
    batch = prepare_latents(s, (5, 4, 8, 8), gens(5))
    for i in range(5):
        torch.testing.assert_close(batch[i:i + 1], prepare_latents(s, (1, 4, 8, 8), torch.Generator().manual_seed(i)), rtol=0, atol=0)
    single = prepare_latents(s, (5, 4, 8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(single[0], batch[0]) and not torch.equal(single[1], batch[1])
    assert torch.equal(prepare_latents(s, [5, 4, 8, 8], gens(5)), batch)     # a list shape works too

def test_seeds_and_unseeded_draws():
    s = sd_scheduler("DDIMScheduler")
    a, b = (prepare_latents(s, (2, 4, 8, 8), torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(prepare_latents(s, (2, 4, 8, 8)), prepare_latents(s, (2, 4, 8, 8)))
    assert prepare_latents(s, (2, 4, 8, 8), dtype=torch.float64).dtype == torch.float64
    assert not torch.equal(a, prepare_latents(s, (2, 4, 8, 8), torch.Generator().manual_seed(4)))   # another seed
    z = prepare_latents(s, (1, 4, 64, 64), torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03                    # a standard normal

def test_one_generator_count_check_one_message():
    "randn_tensor, prepare_latents and the pipelines' argument check all refuse a wrong count with core's message."
    from minidiff.core import randn_tensor, check_generators
    from minidiff.pipeline import check_call_args
    msg = "got 2 generators for 3 images: pass one generator or one per image"
    for call in (lambda: check_generators(gens(2), 3), lambda: randn_tensor((3, 4), gens(2)),
                 lambda: prepare_latents(sd_scheduler("DDIMScheduler"), (3, 4, 8, 8), gens(2)),
                 lambda: check_call_args(3, 10, "pil", gens(2))):
        with pytest.raises(ValueError, match=msg): call()
    check_generators(None, 3); check_generators(torch.Generator(), 3); check_generators(gens(3), 3)

def test_given_latents_are_moved_not_modified():
    s = sd_scheduler("EulerDiscreteScheduler")
    given = torch.ones(1, 4, 8, 8)
    out = prepare_latents(s, (1, 4, 8, 8), latents=given, device="meta")
    assert out.device.type == "meta" and torch.equal(given, torch.ones(1, 4, 8, 8))
    assert prepare_latents(s, (1, 4, 8, 8), latents=given.half()).dtype == torch.float16   # kept, like diffusers

@pytest.mark.parametrize("n", [1, 2, 4])
def test_wrong_number_of_generators(n):
    g = gens(n)
    states = [x.get_state() for x in g]
    with pytest.raises(ValueError, match=f"got {n} generators for 3 images: pass one generator or one per image"):
        prepare_latents(sd_scheduler("UniPCMultistepScheduler"), (3, 4, 8, 8), g)
    assert all(torch.equal(x.get_state(), st) for x, st in zip(g, states))    # nothing drawn

@pytest.mark.parametrize("bad", [(3, 4, 8, 9), (2, 4, 8, 8), (3, 4, 64), (3, 3, 8, 8)])
def test_latents_of_the_wrong_shape(bad):
    with pytest.raises(ValueError, match=r"latents must have shape \(3, 4, 8, 8\), got " + repr(bad).replace("(", r"\(").replace(")", r"\)")):
        prepare_latents(sd_scheduler("UniPCMultistepScheduler"), (3, 4, 8, 8), latents=torch.zeros(bad))
