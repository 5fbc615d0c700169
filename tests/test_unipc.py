"UniPCMultistepScheduler: full-loop parity with diffusers over every option and step count, configs, errors."
import math, re
import pytest
import torch
from minidiff.unipc import UniPCMultistepScheduler
from minidiff.schedule import scheduler_loop, toy_model_fn

import diffusers
from refconfigs import SD, CAT, assert_close_finite
STEPS = [1, 2, 3, 5, 10, 25, 50, 100]
OPTIONS = [{}, dict(solver_type='bh1', final_sigmas_type='sigma_min'), dict(solver_order=3), dict(solver_order=1),
           dict(disable_corrector=[0, 2]), dict(timestep_spacing='leading'), dict(timestep_spacing='trailing'),
           dict(final_sigmas_type='sigma_min'), dict(lower_order_final=False, final_sigmas_type='sigma_min'),
           dict(prediction_type='v_prediction'), dict(prediction_type='sample'), dict(predict_x0=False, final_sigmas_type='sigma_min'),
           dict(thresholding=True, prediction_type='sample', sample_max_value=3.0), dict(thresholding=True),
           dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, final_sigmas_type='sigma_min'),
           dict(rescale_betas_zero_snr=True, timestep_spacing='trailing'), dict(beta_schedule='squaredcos_cap_v2'),
           dict(solver_order=3, predict_x0=False, final_sigmas_type='sigma_min')]
WORST = {}

def sample(): return (torch.arange(768).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)

def loop_pair(config, n, **kw):
    ours, ref = UniPCMultistepScheduler.from_config(config, **kw), diffusers.UniPCMultistepScheduler.from_config(config, **kw)
    ts, xs = scheduler_loop(ours, n, sample(), toy_model_fn)
    ts_ref, xs_ref = scheduler_loop(ref, n, sample(), toy_model_fn)
    assert ours.init_noise_sigma == ref.init_noise_sigma
    exact = not kw.get('rescale_betas_zero_snr')   # minidiff.schedule.rescale_zero_terminal_snr rounds differently (~1 ulp)
    assert_close_finite(ours.sigmas, ref.sigmas, rtol=0 if exact else 1e-5, atol=0)
    return ts, xs, ts_ref, xs_ref

def _grid():
    "Every option at every step count; the default run keeps the defaults at all counts and every option at 3 and 10 steps."
    for kw in OPTIONS:
        for n in STEPS:
            marks = [pytest.mark.slow] if kw and n not in (3, 10) else []
            yield pytest.param(kw, n, marks=marks, id=f"{','.join(f'{k}={v}' for k, v in kw.items()) or 'default'}-{n}")

@pytest.mark.parametrize('kw,n', list(_grid()))
@pytest.mark.parametrize('name,config', [('sd', SD), ('cat', CAT)])
def test_full_loop_parity(name, config, kw, n):
    ts, xs, ts_ref, xs_ref = loop_pair(config, n, **kw)
    assert ts.tolist() == ts_ref.tolist()
    assert len(xs) == len(xs_ref) == n
    for x, x_ref in zip(xs, xs_ref): assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)
    WORST[name, str(kw), n] = max((x - x_ref).abs().max().item() for x, x_ref in zip(xs, xs_ref))

@pytest.mark.parametrize('kw', [dict(solver_type='bh1'), dict(predict_x0=False)])
def test_nan_at_zero_final_sigma_like_diffusers(kw):
    "bh1 / eps-space UniPC multiply inf by 0 on the last step to sigma=0: NaN in diffusers, so NaN here too."
    _, xs, _, xs_ref = loop_pair(SD, 10, **kw)
    for x, x_ref in zip(xs, xs_ref): torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(xs[-1]).all() and torch.isnan(xs_ref[-1]).all()

def test_solver_order_3_without_lower_order_final_fails_like_diffusers():
    with pytest.raises(torch.linalg.LinAlgError): loop_pair(SD, 10, solver_order=3, lower_order_final=False)

def test_reference_sums():
    for n, ref_sum, ref_mean in [(25, 191.424622, 0.249251), (50, 193.790436, 0.252331)]:
        x = scheduler_loop(UniPCMultistepScheduler.from_config(SD), n, sample(), toy_model_fn)[1][-1]
        assert math.isclose(x.abs().sum().item(), ref_sum, rel_tol=1e-5) and math.isclose(x.abs().mean().item(), ref_mean, rel_tol=1e-5)

def test_timesteps_and_sigmas_sd():
    s = UniPCMultistepScheduler.from_config(SD)
    s.set_timesteps(25)
    assert s.timesteps.tolist() == [999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519, 480, 440, 400,
                                    360, 320, 280, 240, 200, 160, 120, 80, 40]
    assert s.timesteps.dtype == torch.int64 and s.init_noise_sigma == 1.0 and s.order == 1
    assert_close_finite(s.sigmas[[0, 1, 2, -3, -2, -1]], torch.tensor([14.614647, 11.542775, 9.237426, 0.298264, 0.199059, 0.0]))
    s.set_timesteps(20); assert s.timesteps[[0, 10, -1]].tolist() == [999, 500, 50]
    s.set_timesteps(3); assert s.timesteps.tolist() == [999, 666, 333]
    ref = diffusers.UniPCMultistepScheduler.from_config(SD); ref.set_timesteps(3)
    assert torch.equal(s.sigmas, ref.sigmas)
    for k in ('betas', 'alphas_cumprod', 'alpha_t', 'sigma_t', 'lambda_t'):
        assert torch.equal(getattr(UniPCMultistepScheduler.from_config(SD), k), getattr(ref, k)), k

def test_begin_index_and_add_noise_parity():
    "img2img-style: start mid-schedule with set_begin_index; add_noise at the start level."
    ours, ref = UniPCMultistepScheduler.from_config(SD), diffusers.UniPCMultistepScheduler.from_config(SD)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500])
    assert_close_finite(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)  # before set_timesteps
    xs = []
    for s in (ours, ref):
        s.set_timesteps(25); s.set_begin_index(10)
        x = s.add_noise(x0, noise, s.timesteps[10:11])
        for tt in s.timesteps[10:]: x = s.step(toy_model_fn(x, tt), tt, x).prev_sample
        xs.append(x)
    assert_close_finite(xs[0], xs[1], rtol=1e-5, atol=1e-6)

def test_step_outputs_and_dtype():
    s = UniPCMultistepScheduler.from_config(SD); s.set_timesteps(5)
    x = sample().double()
    out = s.step(toy_model_fn(x, s.timesteps[0]), s.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and out[0].dtype == torch.float64 and out[0].shape == x.shape
    assert s.step_index == 1 and len(s) == 1000

def test_configs_both_ways(tmp_path):
    ours, ref = UniPCMultistepScheduler.from_config(SD), diffusers.UniPCMultistepScheduler.from_config(SD)
    assert dict(diffusers.UniPCMultistepScheduler.from_config(ours.config).config) == dict(ref.config)
    strip = lambda c: {k: v for k, v in c.items() if k != '_use_default_values'}
    assert strip(UniPCMultistepScheduler.from_config(ref.config).config) == strip(ours.config)
    assert ours.config.skip_prk_steps is True and ours.config.timestep_spacing == 'linspace' and ours.config.steps_offset == 1
    ours.save_pretrained(tmp_path)
    assert strip(UniPCMultistepScheduler.from_pretrained(tmp_path).config) == strip(ours.config)
    assert strip(diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path).config) == strip(ref.config)

def test_from_dpm_solver_config_maps_solver_type():
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(SD)
    ours, ref = UniPCMultistepScheduler.from_config(dpm.config), diffusers.UniPCMultistepScheduler.from_config(dpm.config)
    assert ours.config.solver_type == ref.config.solver_type == 'bh2'
    x, x_ref = (scheduler_loop(s, 10, sample(), toy_model_fn)[1][-1] for s in (ours, ref))
    assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize('kw,msg', [
    (dict(beta_schedule='cosine'), "unknown beta_schedule 'cosine'"),
    (dict(timestep_spacing='even'), "unknown timestep_spacing 'even'"),
    (dict(prediction_type='flow'), "unknown prediction_type 'flow'"),
    (dict(solver_type='bh3'), "unknown solver_type 'bh3'"),
    (dict(final_sigmas_type='one'), "unknown final_sigmas_type 'one'"),
    (dict(solver_order=0), "solver_order must be a positive int, got 0"),
    (dict(use_exponential_sigmas=True, use_beta_sigmas=True), "only one of"),
    (dict(shift_terminal=0.1, use_flow_sigmas=True), "shift_terminal=0.1 is not supported"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True is not supported")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg): UniPCMultistepScheduler.from_config(SD, **kw)

@pytest.mark.parametrize('n', [0, -1, 1001, 2.5, '10', True])
def test_bad_num_inference_steps_keeps_state(n):
    s = UniPCMultistepScheduler.from_config(SD); s.set_timesteps(10)
    ts, sigmas = s.timesteps.clone(), s.sigmas.clone()
    err, msg = ((ValueError, f"num_inference_steps={n} must be between 1 and num_train_timesteps=1000") if type(n) is int
                else (TypeError, f"num_inference_steps must be an int, got {re.escape(repr(n))}"))
    with pytest.raises(err, match=msg): s.set_timesteps(n)
    assert torch.equal(s.timesteps, ts) and torch.equal(s.sigmas, sigmas)

def test_step_before_set_timesteps():
    with pytest.raises(ValueError, match=r"call set_timesteps\(num_inference_steps\) before step\(\)"):
        UniPCMultistepScheduler.from_config(SD).step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))

def test_worst_parity_error_report():
    "Runs last: prints the worst absolute error of the parity grid (0 when the loops are bit-identical)."
    if WORST: print(f"\nUniPC worst |ours - diffusers| over {len(WORST)} loops: {max(WORST.values()):.3e}")

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('kw', [{}, dict(solver_order=3), dict(thresholding=True)])
def test_low_and_high_precision_parity(dtype, kw):
    "Samples keep their dtype and match diffusers in it (sigmas stay float32, as in diffusers)."
    xs = [scheduler_loop(cls.from_config(SD, **kw), 10, sample().to(dtype), toy_model_fn)[1]
          for cls in (UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler)]
    for x, x_ref in zip(*xs):
        assert x.dtype == dtype
        assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)

def test_step_after_last_timestep():
    s = UniPCMultistepScheduler.from_config(SD); s.set_timesteps(2)
    x = sample()
    for t in s.timesteps: x = s.step(toy_model_fn(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps are done: call set_timesteps"): s.step(x, 0, x)
    s.set_timesteps(2); s.step(toy_model_fn(x, 999), 999, x)


def test_unipc_schedule_errors_and_index():
    "Moved from nbs/11_unipc: the schedule's step-count error and the index of a timestep."
    from minidiff.unipc import unipc_schedule
    from minidiff.schedule import train_schedule
    cfg = dict(num_train_timesteps=1000, use_karras_sigmas=False, timestep_spacing='linspace', steps_offset=1,
               final_sigmas_type='zero')
    ac = train_schedule(1000, 0.00085, 0.012, 'scaled_linear')[1]
    with pytest.raises(ValueError, match="num_inference_steps=1001 must be between 1 and num_train_timesteps=1000"):
        unipc_schedule(ac, 1001, cfg)
    s = UniPCMultistepScheduler.from_config(SD)
    s.set_timesteps(25)
    assert s.index_for_timestep(959) == 1 and s.index_for_timestep(3) == 24   # missing: the last step


def test_threshold_in_x0_space():
    from minidiff.schedule import threshold_sample
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert threshold_sample(x0 * 5, 0.995, 1.0).abs().max().item() == pytest.approx(1.0)


# --- exponential, beta and flow sigmas; custom flow sigmas (issue 15) ------------------------------------------------

NEW_OPTIONS = [dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
               dict(use_exponential_sigmas=True, sigma_min=0.05, sigma_max=12.0, final_sigmas_type='sigma_min'),
               dict(use_beta_sigmas=True, solver_order=3, prediction_type='v_prediction'),
               dict(use_flow_sigmas=True), dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type='flow_prediction'),
               dict(use_flow_sigmas=True, use_karras_sigmas=True), dict(use_flow_sigmas=True, final_sigmas_type='sigma_min'),
               dict(use_flow_sigmas=True, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0, solver_order=3)]

@pytest.mark.parametrize('kw', NEW_OPTIONS)
@pytest.mark.parametrize('config', [SD, CAT])
def test_new_sigma_options_exact(kw, config):
    for n in [1, 2, 5, 10, 25]:
        ts, xs, ts_ref, xs_ref = loop_pair(config, n, **kw)
        assert torch.equal(ts, ts_ref)
        for x, x_ref in zip(xs, xs_ref): assert_close_finite(x, x_ref, rtol=0, atol=0)

def test_flow_and_karras_sigma_values():
    "diffusers' own check: sigma_min=0.01, sigma_max=200, 5 steps."
    s = UniPCMultistepScheduler(sigma_min=0.01, sigma_max=200.0, use_flow_sigmas=True, use_karras_sigmas=True)
    s.set_timesteps(5)
    want = torch.tensor([0.9950248599052429, 0.9787454605102539, 0.8774884343147278, 0.3604971766471863,
                         0.009900986216962337, 0.0])
    ref = diffusers.UniPCMultistepScheduler(sigma_min=0.01, sigma_max=200.0, use_flow_sigmas=True, use_karras_sigmas=True)
    ref.set_timesteps(5)
    assert_close_finite(s.sigmas, ref.sigmas, rtol=0, atol=0); assert torch.equal(s.timesteps, ref.timesteps)
    assert_close_finite(s.sigmas, want, rtol=1e-6, atol=1e-7)  # the values as diffusers' test prints them

def test_custom_flow_sigmas_exact():
    import numpy as np
    sig = np.linspace(1.0, 0.05, 8)
    a = UniPCMultistepScheduler.from_config(SD, use_flow_sigmas=True, flow_shift=2.0)
    b = diffusers.UniPCMultistepScheduler.from_config(SD, use_flow_sigmas=True, flow_shift=2.0)
    for s in (a, b): s.set_timesteps(sigmas=sig.copy())
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas) and a.num_inference_steps == 8
    assert sig[0] == 1.0  # the caller's array is not changed
    with pytest.raises(ValueError, match='use_flow_sigmas=True'): UniPCMultistepScheduler().set_timesteps(sigmas=[0.5, 0.1])
    with pytest.raises(ValueError, match='only one of'): UniPCMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match='flow_prediction needs predict_x0=True'):
        s = UniPCMultistepScheduler(prediction_type='flow_prediction', predict_x0=False, use_flow_sigmas=True)
        s.set_timesteps(2); s.step(torch.zeros(1, 1, 2, 2), s.timesteps[0], torch.zeros(1, 1, 2, 2))
