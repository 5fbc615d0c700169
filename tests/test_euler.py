"Euler and Euler-ancestral schedulers: bad input, and parity with diffusers beyond the notebook's cases."
import json, tempfile
from pathlib import Path
import pytest, torch
import diffusers
from minidiff.euler import EulerDiscreteScheduler, EulerAncestralDiscreteScheduler
from minidiff.schedule import scheduler_loop, toy_model_fn

from refconfigs import SD, CAT, assert_close_finite
PAIRS = [(EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
         (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler)]
STEPS = [1, 2, 3, 5, 10, 25, 50]

def rel(a, b): return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

def run(s, n, x, seed=0, model=toy_model_fn, begin_index=None, **step_kw):
    "A full loop recording (prev_sample, pred_original_sample) after each step; `step_kw` go to `step`."
    g = torch.Generator().manual_seed(seed)
    s.set_timesteps(n)
    ts = s.timesteps if begin_index is None else s.timesteps[begin_index:]
    if begin_index is not None: s.set_begin_index(begin_index)
    x, outs = x * s.init_noise_sigma, []
    for t in ts:
        out = s.step(model(s.scale_model_input(x, t), t), t, x, generator=g, **step_kw)
        x = out.prev_sample
        outs.append((out.prev_sample, out.pred_original_sample))
    return outs

def check_loop(ours, ref, n, rtol=1e-5, **kw):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = run(ours, n, x, **kw), run(ref, n, x, **kw)
    assert_close_finite(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert_close_finite(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    assert torch.as_tensor(ours.init_noise_sigma).item() == torch.as_tensor(ref.init_noise_sigma).item()
    errs = [max(rel(p, q), rel(p0, q0)) for (p, p0), (q, q0) in zip(a, b)]
    assert max(errs) < rtol, (n, kw, max(errs))
    return max(errs)

# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cls', [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize('kw, msg', [(dict(beta_schedule='cosine'), "beta_schedule 'cosine'"),
                                     (dict(timestep_spacing='even'), "timestep_spacing 'even'"),
                                     (dict(prediction_type='flow_prediction'), "prediction_type 'flow_prediction'")])
def test_bad_config(cls, kw, msg):
    with pytest.raises(ValueError, match=msg): cls(**kw)

@pytest.mark.parametrize('kw, msg', [(dict(interpolation_type='cubic'), "interpolation_type 'cubic'"),
                                     (dict(final_sigmas_type='one'), "final_sigmas_type 'one'"),
                                     (dict(timestep_type='ode'), "timestep_type 'ode'"),
                                     (dict(use_exponential_sigmas=True, use_beta_sigmas=True), 'only one of'),
                                     (dict(use_karras_sigmas=True, use_beta_sigmas=True), 'only one of')])
def test_bad_euler_config(kw, msg):
    with pytest.raises(ValueError, match=msg): EulerDiscreteScheduler(**kw)

def test_ancestral_refuses_sample_prediction():
    with pytest.raises(ValueError, match="prediction_type 'sample'"): EulerAncestralDiscreteScheduler(prediction_type='sample')

@pytest.mark.parametrize('cls', [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_step_errors(cls):
    s = cls.from_config(SD)
    for n in [0, -3, 1001, 2.5, True]:
        err, msg = (ValueError, f'num_inference_steps={n} must be between') if type(n) is int else (TypeError, f'must be an int, got {n!r}')
        with pytest.raises(err, match=msg): s.set_timesteps(n)
    assert s.num_inference_steps is None and len(s.timesteps) == 1000  # a failed call leaves the state alone
    s.set_timesteps(2)
    with pytest.raises(ValueError, match='integer timestep 1'): s.step(torch.zeros(1), 1, torch.zeros(1))
    with pytest.raises(ValueError, match='integer timestep'): s.step(torch.zeros(1), torch.tensor(999), torch.zeros(1))
    with pytest.raises(ValueError, match='timestep 500.0 is not one of'): s.step(torch.zeros(1), torch.tensor(500.), torch.zeros(1))
    for t in s.timesteps: s.step(torch.zeros(1), t, s.scale_model_input(torch.ones(1), t))
    with pytest.raises(ValueError, match='all 2 steps are done'): s.step(torch.zeros(1), s.timesteps[-1], torch.zeros(1))

# --- parity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('ours, ref', PAIRS)
@pytest.mark.parametrize('cfg', [SD, CAT])
@pytest.mark.parametrize('pred', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('spacing', ['linspace', 'leading', 'trailing'])
def test_parity_spacings(ours, ref, cfg, pred, spacing):
    for n in [1, 3, 10]:
        kw = dict(prediction_type=pred, timestep_spacing=spacing)
        check_loop(ours.from_config(cfg, **kw), ref.from_config(cfg, **kw), n)

@pytest.mark.parametrize('kw', [dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, final_sigmas_type='sigma_min'),
                                dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), dict(final_sigmas_type='sigma_min'),
                                dict(interpolation_type='log_linear'), dict(prediction_type='sample'),
                                dict(prediction_type='v_prediction', timestep_type='continuous'),
                                dict(rescale_betas_zero_snr=True, timestep_spacing='trailing'),
                                dict(beta_schedule='squaredcos_cap_v2', use_karras_sigmas=True),
                                dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist())])
def test_euler_options(kw):
    for n in [1, 2, 5, 25]:
        check_loop(EulerDiscreteScheduler.from_config(SD, **kw), diffusers.EulerDiscreteScheduler.from_config(SD, **kw), n, rtol=1e-5)

@pytest.mark.parametrize('churn', [dict(s_churn=1.0), dict(s_churn=40.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)])
def test_euler_churn_parity(churn):
    for n in [1, 3, 10, 25]:
        check_loop(EulerDiscreteScheduler.from_config(SD), diffusers.EulerDiscreteScheduler.from_config(SD), n, seed=7, **churn)

@pytest.mark.parametrize('ours, ref', PAIRS)
def test_begin_index_and_add_noise(ours, ref):
    "img2img style: noise a clean sample to a mid-schedule timestep, then sample from there."
    a, b = ours.from_config(SD), ref.from_config(SD)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999., 500.])  # before set_timesteps: the training timesteps
    assert_close_finite(a.add_noise(x0, noise, t), b.add_noise(x0, noise, t), rtol=0, atol=0)
    for s in (a, b): s.set_timesteps(10)
    ts = a.timesteps[[3, 3]]
    assert_close_finite(a.add_noise(x0, noise, ts), b.add_noise(x0, noise, ts), rtol=0, atol=0)
    check_loop(a, b, 10, begin_index=3)

def test_from_diffusers_pndm_config_and_round_trip():
    pndm = diffusers.PNDMScheduler.from_config(SD)
    a, b = EulerDiscreteScheduler.from_config(pndm.config), diffusers.EulerDiscreteScheduler.from_config(pndm.config)
    assert a.config.timestep_spacing == b.config.timestep_spacing == 'linspace'
    check_loop(a, b, 25)
    with tempfile.TemporaryDirectory() as d:
        a.save_pretrained(d)
        c = diffusers.EulerDiscreteScheduler.from_pretrained(d)
        assert {k: v for k, v in c.config.items() if not k.startswith('_')} == {k: v for k, v in a.config.items() if not k.startswith('_')}
    assert EulerAncestralDiscreteScheduler in a.compatibles and EulerDiscreteScheduler in a.compatibles
    assert len(a) == 1000

def test_half_precision_and_tuple_output():
    a, b = EulerAncestralDiscreteScheduler.from_config(SD), diffusers.EulerAncestralDiscreteScheduler.from_config(SD)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    for s in (a, b): s.set_timesteps(5)
    t = a.timesteps[0]
    out_a = a.step(toy_model_fn(a.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    out_b = b.step(toy_model_fn(b.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert len(out_a) == 2 and out_a[0].dtype == torch.float16
    assert_close_finite(out_a[0], out_b[0], rtol=0, atol=0)

@pytest.mark.slow
@pytest.mark.parametrize('ours, ref', PAIRS)
def test_full_grid(ours, ref):
    for cfg in [SD, CAT]:
        for pred in ['epsilon', 'v_prediction']:
            for spacing in ['linspace', 'leading', 'trailing']:
                for n in STEPS + [100, 1000]:
                    kw = dict(prediction_type=pred, timestep_spacing=spacing)
                    check_loop(ours.from_config(cfg, **kw), ref.from_config(cfg, **kw), n)


def test_bad_input_messages():
    "Moved from nbs/18_euler: unknown config values, stepping before set_timesteps, a bad step count."
    for make, msg in [(lambda: EulerDiscreteScheduler(beta_schedule='cosine'), "beta_schedule 'cosine'"),
                      (lambda: EulerDiscreteScheduler(prediction_type='flow'), "prediction_type 'flow'"),
                      (lambda: EulerAncestralDiscreteScheduler(prediction_type='sample'), "prediction_type 'sample'"),
                      (lambda: EulerDiscreteScheduler(timestep_spacing='even'), "timestep_spacing 'even'")]:
        with pytest.raises(ValueError, match=msg): make()
    s = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match='num_inference_steps=0'): s.set_timesteps(0)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match='integer timestep 0'): s.step(torch.zeros(1), 0, torch.zeros(1))


# --- sigma spacings and custom schedules (issue 15) ----------------------------------------------------------------

@pytest.mark.parametrize('kw', [dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
                                dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=10.0),
                                dict(use_beta_sigmas=True, final_sigmas_type='sigma_min', prediction_type='v_prediction'),
                                dict(use_exponential_sigmas=True, interpolation_type='log_linear')])
@pytest.mark.parametrize('cfg', [SD, CAT])
def test_exponential_and_beta_sigmas_parity(kw, cfg):
    for n in [1, 2, 5, 25]:
        assert check_loop(EulerDiscreteScheduler.from_config(cfg, **kw), diffusers.EulerDiscreteScheduler.from_config(cfg, **kw), n) == 0.0

def run_custom(s, x, **schedule):
    s.set_timesteps(**schedule)
    x, outs = x * s.init_noise_sigma, []
    for t in s.timesteps:
        x = s.step(toy_model_fn(s.scale_model_input(x, t), t), t, x).prev_sample
        outs.append(x)
    return outs

@pytest.mark.parametrize('kw', [dict(), dict(prediction_type='v_prediction'), dict(interpolation_type='log_linear'),
                                dict(final_sigmas_type='sigma_min'), dict(timestep_spacing='trailing')])
@pytest.mark.parametrize('custom', ['timesteps', 'sigmas'])
def test_custom_schedule_parity(kw, custom):
    "set_timesteps(timesteps=...) / (sigmas=...) equal diffusers' bit for bit, and (timesteps) the plain 10-step loop."
    plain = EulerDiscreteScheduler.from_config(SD, **kw); plain.set_timesteps(10)
    schedule = {'num_inference_steps': None, custom: getattr(plain, custom).tolist()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = EulerDiscreteScheduler.from_config(SD, **kw), diffusers.EulerDiscreteScheduler.from_config(SD, **kw)
    xa, xb = run_custom(a, x, **schedule), run_custom(b, x, **schedule)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    assert a.num_inference_steps == b.num_inference_steps  # log_linear: diffusers makes 11 sigmas (+ final) for 10 steps
    for p, q in zip(xa, xb): assert_close_finite(p, q, rtol=0, atol=0)
    if custom == 'timesteps': assert torch.equal(a.sigmas, plain.sigmas)

@pytest.mark.parametrize('args, kw, msg', [
    (dict(num_inference_steps=None), {}, 'pass exactly one of num_inference_steps, timesteps, sigmas'),
    (dict(num_inference_steps=10, timesteps=[999.0, 0.0]), {}, 'pass exactly one'),
    (dict(num_inference_steps=None, timesteps=[999.0], sigmas=[1.0, 0.0]), {}, 'pass exactly one'),
    (dict(num_inference_steps=None, timesteps=[999.0, 0.0]), dict(use_karras_sigmas=True), 'use_karras_sigmas=True'),
    (dict(num_inference_steps=None, timesteps=[999.0, 0.0]), dict(use_beta_sigmas=True), 'use_beta_sigmas=True'),
    (dict(num_inference_steps=None, timesteps=[999.0, 0.0]), dict(timestep_type='continuous', prediction_type='v_prediction'),
     "timestep_type='continuous'")])
def test_custom_schedule_errors(args, kw, msg):
    with pytest.raises(ValueError, match=msg): EulerDiscreteScheduler(**kw).set_timesteps(**args)
    with pytest.raises(ValueError): diffusers.EulerDiscreteScheduler(**kw).set_timesteps(**args)  # diffusers refuses too

@pytest.mark.parametrize('ours, ref', PAIRS)
def test_fresh_scheduler_steps_on_the_training_schedule(ours, ref):
    "As in diffusers, a scheduler steps before set_timesteps, on its 1000 training steps."
    a, b = ours.from_config(SD), ref.from_config(SD)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for s in (a, b): assert s.num_inference_steps is None
    t = a.timesteps[-1]
    outs = [s.step(toy_model_fn(s.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
            for s in (a, b)]
    assert_close_finite(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match='all 1000 steps are done'): a.step(x, t, x)
