"PNDMScheduler: full-loop parity with diffusers (PLMS and PRK), timesteps, configs across schedulers, errors."
import math, re
import pytest
import torch
from minidiff.pndm import PNDMScheduler
from minidiff.unipc import UniPCMultistepScheduler
from minidiff.schedule import scheduler_loop, toy_model_fn

import diffusers
from refconfigs import SD, CAT, assert_close_finite
STEPS = [1, 2, 3, 5, 10, 25, 50, 100]
OPTIONS = [dict(skip_prk_steps=True), dict(skip_prk_steps=False), dict(skip_prk_steps=True, set_alpha_to_one=True),
           dict(skip_prk_steps=True, prediction_type='v_prediction'), dict(skip_prk_steps=False, prediction_type='v_prediction'),
           dict(skip_prk_steps=True, timestep_spacing='linspace'), dict(skip_prk_steps=True, timestep_spacing='trailing'),
           dict(skip_prk_steps=False, timestep_spacing='trailing'), dict(skip_prk_steps=True, steps_offset=1),
           dict(skip_prk_steps=True, beta_schedule='squaredcos_cap_v2')]
WORST = {}

def sample(): return (torch.arange(768).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)

def _grid():
    "Every option at every step count; the default run keeps SD's PLMS at all counts and every option at 5 and 10 steps."
    for kw in OPTIONS:
        for n in STEPS:
            marks = [pytest.mark.slow] if kw != OPTIONS[0] and n not in (5, 10) else []
            yield pytest.param(kw, n, marks=marks, id=f"{','.join(f'{k}={v}' for k, v in kw.items())}-{n}")

@pytest.mark.parametrize('kw,n', list(_grid()))
@pytest.mark.parametrize('name,config', [('sd', SD), ('cat', CAT)])
def test_full_loop_parity(name, config, kw, n):
    ours, ref = PNDMScheduler.from_config(config, **kw), diffusers.PNDMScheduler.from_config(config, **kw)
    if not kw['skip_prk_steps'] and n < 4:     # diffusers fails with a numpy broadcasting error; we say why
        with pytest.raises(ValueError): ref.set_timesteps(n)
        with pytest.raises(ValueError, match=f"skip_prk_steps=False needs num_inference_steps >= 4, got {n}"): ours.set_timesteps(n)
        return
    ts, xs = scheduler_loop(ours, n, sample(), toy_model_fn)
    ts_ref, xs_ref = scheduler_loop(ref, n, sample(), toy_model_fn)
    assert ts.tolist() == ts_ref.tolist() and ours.init_noise_sigma == ref.init_noise_sigma
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod) and torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)
    assert len(xs) == len(xs_ref) == ((n + 1 if n > 1 else 1) if kw['skip_prk_steps'] else 4 * 3 + n - 3)
    for x, x_ref in zip(xs, xs_ref): assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)
    WORST[name, str(kw), n] = max((x - x_ref).abs().max().item() for x, x_ref in zip(xs, xs_ref))

def test_reference_sums():
    for n, ref_sum, ref_mean in [(25, 202.756546, 0.264006), (50, 203.499130, 0.264973)]:
        x = scheduler_loop(PNDMScheduler.from_config(SD), n, sample(), toy_model_fn)[1][-1]
        assert math.isclose(x.abs().sum().item(), ref_sum, rel_tol=1e-5) and math.isclose(x.abs().mean().item(), ref_mean, rel_tol=1e-5)

def test_timesteps_sd():
    s = PNDMScheduler.from_config(SD)
    s.set_timesteps(50)
    assert len(s.timesteps) == 51 and s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == [981, 961, 961] + list(range(941, 0, -20))
    s.set_timesteps(25); assert s.timesteps[:4].tolist() == [961, 921, 921, 881] and s.timesteps[-2:].tolist() == [41, 1]
    s.set_timesteps(3); assert s.timesteps.tolist() == [667, 334, 334, 1]
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000
    assert torch.equal(s.final_alpha_cumprod, s.alphas_cumprod[0])
    assert PNDMScheduler(set_alpha_to_one=True).final_alpha_cumprod.item() == 1.0

def test_prk_timesteps_match_diffusers():
    for n in (4, 10, 25):
        ours, ref = PNDMScheduler(skip_prk_steps=False), diffusers.PNDMScheduler(skip_prk_steps=False)
        ours.set_timesteps(n); ref.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        assert ours.prk_timesteps.tolist() == ref.prk_timesteps.tolist() and ours.plms_timesteps.tolist() == ref.plms_timesteps.tolist()

def test_plms_after_reset_and_return_tuple():
    "set_timesteps resets the multistep history: a second loop gives the same numbers as the first."
    s = PNDMScheduler.from_config(SD)
    a = scheduler_loop(s, 10, sample(), toy_model_fn)[1][-1]
    b = scheduler_loop(s, 10, sample(), toy_model_fn)[1][-1]
    assert torch.equal(a, b)
    s.set_timesteps(5)
    out = s.step(toy_model_fn(sample(), s.timesteps[0]), s.timesteps[0], sample(), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (4, 3, 8, 8)

def test_add_noise_parity():
    ours, ref = PNDMScheduler.from_config(SD), diffusers.PNDMScheduler.from_config(SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 0])
    assert_close_finite(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)

def test_configs_across_schedulers(tmp_path):
    strip = lambda c: {k: v for k, v in c.items() if k != '_use_default_values'}
    ours, ref = PNDMScheduler.from_config(SD), diffusers.PNDMScheduler.from_config(SD)
    assert dict(diffusers.PNDMScheduler.from_config(ours.config).config) == dict(ref.config)
    assert strip(PNDMScheduler.from_config(ref.config).config) == strip(ours.config)
    uni, uni_ref = UniPCMultistepScheduler.from_config(ours.config), diffusers.UniPCMultistepScheduler.from_config(ref.config)
    assert strip(uni.config) == strip(uni_ref.config)
    back, back_ref = PNDMScheduler.from_config(uni.config), diffusers.PNDMScheduler.from_config(uni_ref.config)
    assert strip(back.config) == strip(back_ref.config)
    assert uni.config.skip_prk_steps is True and back.config.skip_prk_steps is True      # PNDM keys survive a UniPC trip
    assert PNDMScheduler.from_config(UniPCMultistepScheduler(solver_order=3).config).config.solver_order == 3  # and vice versa
    assert back.config.timestep_spacing == 'leading' and back.config.steps_offset == 1
    ours.save_pretrained(tmp_path)
    assert strip(PNDMScheduler.from_pretrained(tmp_path).config) == strip(ours.config)
    assert strip(diffusers.PNDMScheduler.from_pretrained(tmp_path).config) == strip(ref.config)
    assert {PNDMScheduler, UniPCMultistepScheduler} <= set(ours.compatibles)
    x, x_ref = (scheduler_loop(s, 10, sample(), toy_model_fn)[1][-1] for s in (back, back_ref))
    assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('kw,msg', [
    (dict(beta_schedule='cosine'), "unknown beta_schedule 'cosine'"),
    (dict(timestep_spacing='even'), "unknown timestep_spacing 'even'"),
    (dict(prediction_type='sample'), "unknown prediction_type 'sample'")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg): PNDMScheduler.from_config(SD, **kw)

@pytest.mark.parametrize('n', [0, -1, 1001, 2.5, '10', True])
def test_bad_num_inference_steps_keeps_state(n):
    s = PNDMScheduler.from_config(SD); s.set_timesteps(10)
    ts = s.timesteps.clone()
    err, msg = ((ValueError, f"num_inference_steps={n} must be between 1 and num_train_timesteps=1000") if type(n) is int
                else (TypeError, f"num_inference_steps must be an int, got {re.escape(repr(n))}"))
    with pytest.raises(err, match=msg): s.set_timesteps(n)
    assert torch.equal(s.timesteps, ts) and s.num_inference_steps == 10

def test_step_before_set_timesteps():
    for s in (PNDMScheduler.from_config(SD), PNDMScheduler()):
        with pytest.raises(ValueError, match=r"call set_timesteps\(num_inference_steps\) before step\(\)"):
            s.step(torch.zeros(1, 4, 8, 8), 981, torch.zeros(1, 4, 8, 8))

def test_plms_before_prk_warmup():
    s = PNDMScheduler(skip_prk_steps=False); s.set_timesteps(10)
    with pytest.raises(ValueError, match="12 PRK warm-up steps"): s.step_plms(torch.zeros(1), 900, torch.zeros(1))

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('skip_prk_steps', [True, False])
def test_low_and_high_precision_parity(dtype, skip_prk_steps):
    xs = [scheduler_loop(cls.from_config(SD, skip_prk_steps=skip_prk_steps), 10, sample().to(dtype), toy_model_fn)[1]
          for cls in (PNDMScheduler, diffusers.PNDMScheduler)]
    for x, x_ref in zip(*xs):
        assert x.dtype == dtype
        assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)

def test_worst_parity_error_report():
    if WORST: print(f"\nPNDM worst |ours - diffusers| over {len(WORST)} loops: {max(WORST.values()):.3e}")



def test_notebook_timesteps_and_errors():
    "Moved from nbs/12_pndm: base and PLMS timesteps, and the spacing error."
    from minidiff.pndm import pndm_timesteps, pndm_step_timesteps
    base = pndm_timesteps(50, steps_offset=1)
    assert base[[0, 1, -1]].tolist() == [1, 21, 981]
    assert pndm_step_timesteps(pndm_timesteps(3, steps_offset=1), 3)[1].tolist() == [667, 334, 334, 1]
    assert pndm_step_timesteps(pndm_timesteps(10), 10, skip_prk_steps=False)[1][0] == 600
    with pytest.raises(ValueError, match="timestep_spacing 'even'"): pndm_timesteps(5, timestep_spacing='even')
