"Scheduler gallery: all eight schedulers swap into the SD pipeline, match diffusers, round-trip configs, save, load, reject bad input."
import inspect, json
from pathlib import Path
import numpy as np, pytest, torch
import minidiff
from minidiff.scheduler_gallery import swap_scheduler, compare_schedulers, GALLERY_STEPS
from minidiff.sd_pipeline import StableDiffusionPipeline
from minidiff.tiny_sd import save_tiny_sd
from minidiff.schedule import scheduler_loop, toy_model_fn
from refconfigs import assert_close_finite

CONFIGS = Path(__file__).parents[1]/"nbs"/"configs"
SD_CONFIG = json.loads((CONFIGS/"runwayml_stable-diffusion-v1-5"/"scheduler"/"scheduler_config.json").read_text())
CAT_CONFIG = json.loads((CONFIGS/"google_ddpm-cat-256"/"scheduler_config.json").read_text())
NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler"}

@pytest.fixture(scope="module")
def sd(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp("sd")/"sd-v1-5")

def ours(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder); pipe.set_progress_bar_config(disable=True)
    return pipe

def reference(folder):
    import diffusers
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref

@pytest.fixture(scope="module")
def pipes(sd): return ours(sd), reference(sd)

def public(config): return {k: v for k, v in dict(config).items() if not k.startswith("_")}

def test_compatibles_list_all_eight(sd):
    assert sorted(c.__name__ for c in ours(sd).scheduler.compatibles) == sorted(NAMES)
    for name in NAMES:
        assert sorted(c.__name__ for c in getattr(minidiff, name).from_config(SD_CONFIG).compatibles) == sorted(NAMES)

@pytest.mark.parametrize("name", NAMES)
def test_swapped_pipeline_matches_diffusers(sd, pipes, name):
    import diffusers
    a_pipe, b_pipe = pipes   # both start from the folder's PNDM scheduler
    a_pipe.scheduler = minidiff.PNDMScheduler.from_pretrained(sd, subfolder="scheduler")
    b_pipe.scheduler = diffusers.PNDMScheduler.from_pretrained(sd, subfolder="scheduler")
    swap_scheduler(a_pipe, name)
    b_pipe.scheduler = getattr(diffusers, name).from_config(b_pipe.scheduler.config)
    assert type(a_pipe.scheduler).__name__ == name
    kw = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", num_inference_steps=3,
              guidance_scale=7.5, height=32, width=32, output_type="np")
    a = a_pipe(**kw, generator=torch.Generator().manual_seed(8)).images
    b = b_pipe(**kw, generator=torch.Generator().manual_seed(8)).images
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    print(f"\n{name}: max pixel error {np.abs(a - b).max():.1e}")

def test_swap_scheduler_and_compare_schedulers(sd):
    pipe = ours(sd)
    assert type(swap_scheduler(pipe, minidiff.EulerDiscreteScheduler).scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.skip_prk_steps is True
    for bad in ("HeunDiscreteScheduler", "UNet2DModel", int):
        with pytest.raises(ValueError, match="cannot replace EulerDiscreteScheduler"): swap_scheduler(pipe, bad)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    steps = {"DDIMScheduler": 2, "EulerAncestralDiscreteScheduler": 2}
    out = compare_schedulers(pipe, "a cat", steps, seed=3, height=32, width=32)
    assert list(out) == list(steps) and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert all(im.size == (32, 32) and sec > 0 for im, sec in out.values())
    again = compare_schedulers(pipe, "a cat", steps, seed=3, height=32, width=32)
    assert all(np.array_equal(np.asarray(out[k][0]), np.asarray(again[k][0])) for k in steps)
    assert set(GALLERY_STEPS) == set(NAMES) - {"DDPMScheduler"}

@pytest.mark.parametrize("config", [SD_CONFIG, CAT_CONFIG], ids=["sd", "cat"])
@pytest.mark.parametrize("a_name", NAMES)
def test_from_config_round_trips(config, a_name):
    "Keys set by the file that B does not know stay in B's config (defaults A filled in do not, as in diffusers); B -> A restores A."
    import diffusers
    a = getattr(minidiff, a_name).from_config(config)
    for b_name in NAMES:
        b_cls = getattr(minidiff, b_name)
        b = b_cls.from_config(a.config)
        known, defaults = set(inspect.signature(b_cls.__init__).parameters), a.config.get("_use_default_values", [])
        assert all(b.config[k] == v for k, v in public(a.config).items() if k not in known and k not in defaults), (a_name, b_name)
        ref_b = getattr(diffusers, b_name).from_config(getattr(diffusers, a_name).from_config(config).config)
        assert public(b.config) == public(ref_b.config), (a_name, b_name)
        back = type(a).from_config(b.config)
        assert public(back.config) == public(a.config), (a_name, b_name)
        for n in (7, 50):
            a.set_timesteps(n); back.set_timesteps(n)
            assert torch.equal(a.timesteps, back.timesteps), (a_name, b_name, n)

@pytest.mark.parametrize("name", NAMES)
def test_repr_reads_like_diffusers(name):
    import diffusers
    ours_repr, ref_repr = repr(getattr(minidiff, name).from_config(SD_CONFIG)), repr(getattr(diffusers, name).from_config(SD_CONFIG))
    head, body = ours_repr.split(" ", 1)
    assert head == name and body.startswith("{\n  \"_class_name\"")
    strip = lambda s: {k: v for k, v in json.loads(s.split(" ", 1)[1]).items() if k != "_diffusers_version"}
    assert strip(ours_repr) == strip(ref_repr)

@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_pretrained(tmp_path, name):
    import diffusers
    s = getattr(minidiff, name).from_config(SD_CONFIG, timestep_spacing="trailing")
    s.save_pretrained(tmp_path/"scheduler")
    assert json.loads((tmp_path/"scheduler"/"scheduler_config.json").read_text())["_class_name"] == name
    loaded = getattr(minidiff, name).from_pretrained(tmp_path, subfolder="scheduler")
    ref = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    assert public(loaded.config) == public(s.config)
    for x in (s, loaded, ref): x.set_timesteps(10)
    assert torch.equal(loaded.timesteps, s.timesteps) and torch.equal(loaded.timesteps, ref.timesteps)

def _first_step(lib, name):
    "Step a fresh scheduler without set_timesteps (seeded); the output, or the exception raised."
    s = getattr(lib, name).from_config(SD_CONFIG)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[0] if getattr(s, "timesteps", None) is not None else torch.tensor(999)
    gen = {"generator": torch.Generator().manual_seed(1)} if "generator" in inspect.signature(s.step).parameters else {}
    try: return s.step(x * 0.1, t, x, **gen).prev_sample
    except Exception as e: return e

@pytest.mark.parametrize("name", NAMES)
def test_step_before_set_timesteps(name):
    "Where diffusers cannot step, ours says to call set_timesteps; where it can (the training schedule), ours steps alike."
    import diffusers
    ref, got = _first_step(diffusers, name), _first_step(minidiff, name)
    if isinstance(ref, Exception) or isinstance(got, Exception):
        assert isinstance(got, ValueError) and "set_timesteps" in str(got), (name, got)
        assert isinstance(ref, Exception), (name, ref)
    else: assert_close_finite(got, ref, rtol=0, atol=0)

@pytest.mark.parametrize("name", NAMES)
def test_too_many_steps_names_the_value_and_keeps_state(name):
    s = getattr(minidiff, name).from_config(SD_CONFIG)
    s.set_timesteps(5); before = s.timesteps.clone()
    with pytest.raises(ValueError, match="1001"): s.set_timesteps(1001)
    assert torch.equal(s.timesteps, before)
    s.set_timesteps(5); assert torch.equal(s.timesteps, before)

@pytest.mark.parametrize("key,value", [("beta_schedule", "cubic"), ("timestep_spacing", "weird_spacing"),
                                       ("prediction_type", "bogus_type")])
@pytest.mark.parametrize("name", NAMES)
def test_unknown_config_values_name_the_value(name, key, value):
    "All eight refuse when built; diffusers refuses beta_schedule when built (NotImplementedError), the others at set_timesteps / step."
    with pytest.raises(ValueError, match=f"'{value}'"): getattr(minidiff, name).from_config(SD_CONFIG, **{key: value})

STEPS = [1, 2, 3, 5, 10, 25, 50]

def worst_loop_error(name, config):
    "Worst relative error (max |ours - ref| / max |ref|, over every step) of full loops at `STEPS`."
    import diffusers
    seed = 0 if name in STOCHASTIC else None
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for n in STEPS:
        try: tb, xb = scheduler_loop(getattr(diffusers, name).from_config(config), n, sample, toy_model_fn, seed=seed)
        except ValueError:   # PNDM with PRK steps (ddpm-cat config) needs 4 steps: diffusers fails on a broadcast
            with pytest.raises(ValueError, match="num_inference_steps"):
                scheduler_loop(getattr(minidiff, name).from_config(config), n, sample, toy_model_fn, seed=seed)
            continue
        ta, xa = scheduler_loop(getattr(minidiff, name).from_config(config), n, sample, toy_model_fn, seed=seed)
        assert torch.equal(ta.to(tb.dtype), tb), (name, n)
        worst = max(worst, max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(xa, xb)))
    return worst

def test_full_loop_parity_table():
    table = {name: {c: worst_loop_error(name, cfg) for c, cfg in (("sd", SD_CONFIG), ("ddpm-cat", CAT_CONFIG))} for name in NAMES}
    print(f"\n{'scheduler':34}{'sd':>10}{'ddpm-cat':>10}")
    for name, row in table.items(): print(f"{name:34}{row['sd']:10.1e}{row['ddpm-cat']:10.1e}")
    assert all(e < 1e-5 for row in table.values() for e in row.values()), table


def test_minidiff_pipeline_saves_what_diffusers_reloads(sd, tmp_path):
    "Mixing that works: minidiff's own pipeline (here with Euler swapped in) saves a folder diffusers loads and samples alike."
    import diffusers
    pipe = ours(sd); swap_scheduler(pipe, "EulerDiscreteScheduler")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path/"model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    ref = reference(tmp_path)
    assert type(ref.scheduler) is diffusers.EulerDiscreteScheduler and public(ref.scheduler.config) == public(pipe.scheduler.config)
    kw = dict(num_inference_steps=3, output_type="np")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = ref("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert_close_finite(torch.from_numpy(a), torch.from_numpy(b), rtol=0, atol=1e-4)

def test_minidiff_scheduler_samples_inside_a_diffusers_pipeline(pipes):
    "Mixing that works: a minidiff scheduler in a diffusers pipeline samples as diffusers' own scheduler does."
    import diffusers
    _, ref = pipes
    kw, original = dict(num_inference_steps=3, output_type="np"), ref.scheduler
    try:
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="sde-dpmsolver++")
        b = ref("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        ref.scheduler = minidiff.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
        a = ref("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    finally: ref.scheduler = original
    assert_close_finite(torch.from_numpy(a), torch.from_numpy(b), rtol=0, atol=0)

@pytest.fixture(scope="module")
def micro_pipes():
    from minidiff.core import MICRO_SD
    return ours(MICRO_SD), reference(MICRO_SD)

@pytest.mark.parametrize("name", NAMES)
def test_micro_sd_gallery_matches_diffusers(micro_pipes, name):
    "The notebook's gallery model: the shipped micro SD (trained weights) with each scheduler swapped in equals diffusers'."
    import diffusers
    from minidiff.core import MICRO_SD
    a_pipe, b_pipe = micro_pipes
    a_pipe.scheduler = minidiff.PNDMScheduler.from_pretrained(MICRO_SD, subfolder="scheduler")
    b_pipe.scheduler = diffusers.PNDMScheduler.from_pretrained(MICRO_SD, subfolder="scheduler")
    swap_scheduler(a_pipe, name)
    b_pipe.scheduler = getattr(diffusers, name).from_config(b_pipe.scheduler.config)
    kw = dict(prompt="a yellow triangle on a purple background", num_inference_steps=10, output_type="np")
    a = a_pipe(**kw, generator=torch.Generator().manual_seed(8)).images
    b = b_pipe(**kw, generator=torch.Generator().manual_seed(8)).images
    assert a.shape == (1, 64, 64, 3)
    assert_close_finite(torch.from_numpy(a), torch.from_numpy(b), rtol=0, atol=1e-4)
