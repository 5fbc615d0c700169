"DPMSolverMultistepScheduler: bad input, and parity with diffusers beyond the notebook's cases."
import json, tempfile
from pathlib import Path
import warnings
import pytest, torch
import diffusers
from minidiff.dpm_solver import DPMSolverMultistepScheduler, alpha_sigma_lambda
from minidiff.schedule import toy_model_fn

from refconfigs import SD, CAT, assert_close_finite
STEPS = [1, 2, 3, 5, 10, 25, 50]

def rel(a, b): return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

def pair(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # diffusers deprecates algorithm_type='dpmsolver'
        return DPMSolverMultistepScheduler.from_config(cfg, **kw), diffusers.DPMSolverMultistepScheduler.from_config(cfg, **kw)

def run(s, n, x, model=toy_model_fn, begin_index=None):
    s.set_timesteps(n)
    ts = s.timesteps if begin_index is None else s.timesteps[begin_index:]
    if begin_index is not None: s.set_begin_index(begin_index)
    x, outs = x * s.init_noise_sigma, []
    for t in ts:
        x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
        outs.append(x)
    return outs

def check_loop(ours, ref, n, shape=(2, 4, 8, 8), **kw):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    a, b = run(ours, n, x, **kw), run(ref, n, x, **kw)
    assert_close_finite(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert_close_finite(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    assert ours.init_noise_sigma == ref.init_noise_sigma and ours.num_inference_steps == ref.num_inference_steps
    err = max(rel(p, q) for p, q in zip(a, b))
    assert err < 1e-5, (n, err)
    return err

# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw, msg', [(dict(beta_schedule='cosine'), "beta_schedule 'cosine'"),
                                     (dict(timestep_spacing='even'), "timestep_spacing 'even'"),
                                     (dict(prediction_type='flow_prediction'), "prediction_type 'flow_prediction'"),
                                     (dict(algorithm_type='dpmsolver3'), "algorithm_type 'dpmsolver3'"),
                                     (dict(algorithm_type='sde-dpmsolver', final_sigmas_type='sigma_min', solver_order=3), 'solver_order 3'),
                                     (dict(algorithm_type='sde-dpmsolver'), "final_sigmas_type 'zero' is not supported"),
                                     (dict(solver_type='rk4'), "solver_type 'rk4'"), (dict(solver_order=4), 'solver_order 4'),
                                     (dict(final_sigmas_type='one'), "final_sigmas_type 'one'"),
                                     (dict(algorithm_type='dpmsolver'), "final_sigmas_type 'zero' is not supported for algorithm_type 'dpmsolver'"),
                                     (dict(use_flow_sigmas=True), 'use_flow_sigmas'),
                                     (dict(use_exponential_sigmas=True, use_karras_sigmas=True), 'only one of')])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg): DPMSolverMultistepScheduler(**kw)

def test_step_errors():
    s = DPMSolverMultistepScheduler.from_config(SD)
    with pytest.raises(ValueError, match='set_timesteps'): s.step(torch.zeros(1), 999, torch.zeros(1))
    for n in [0, 1001, 2.5]:
        err, msg = (ValueError, f'num_inference_steps={n} must be between') if type(n) is int else (TypeError, f'must be an int, got {n!r}')
        with pytest.raises(err, match=msg): s.set_timesteps(n)
    assert s.num_inference_steps is None
    s.set_timesteps(2)
    for t in s.timesteps: s.step(torch.zeros(1, 1, 2, 2), t, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match='all 2 steps are done'): s.step(torch.zeros(1, 1, 2, 2), s.timesteps[-1], torch.zeros(1, 1, 2, 2))

def test_configs_from_other_schedulers_load_as_in_diffusers():
    assert DPMSolverMultistepScheduler(solver_type='bh2').config.solver_type == 'midpoint'
    s = DPMSolverMultistepScheduler(algorithm_type='deis', final_sigmas_type='sigma_min')
    assert s.config.algorithm_type == 'dpmsolver++'
    unipc = diffusers.UniPCMultistepScheduler.from_config(SD)
    check_loop(*pair(unipc.config), 20)
    pndm = diffusers.PNDMScheduler.from_config(SD)
    a, b = pair(pndm.config)
    assert a.config.timestep_spacing == b.config.timestep_spacing == 'linspace'
    check_loop(a, b, 20)

# --- parity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [SD, CAT])
@pytest.mark.parametrize('pred', ['epsilon', 'v_prediction', 'sample'])
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('solver_type', ['midpoint', 'heun'])
def test_parity_orders(cfg, pred, order, solver_type):
    for n in [1, 2, 3, 5, 16]:
        check_loop(*pair(cfg, prediction_type=pred, solver_order=order, solver_type=solver_type), n)

@pytest.mark.parametrize('kw', [dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, final_sigmas_type='sigma_min'),
                                dict(euler_at_final=True), dict(lower_order_final=False),
                                dict(lower_order_final=False, final_sigmas_type='sigma_min'),
                                dict(timestep_spacing='leading'), dict(timestep_spacing='trailing'),
                                dict(beta_schedule='squaredcos_cap_v2', lambda_min_clipped=-5.1),
                                dict(rescale_betas_zero_snr=True, timestep_spacing='trailing', final_sigmas_type='sigma_min'),
                                dict(thresholding=True), dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
                                dict(algorithm_type='dpmsolver', final_sigmas_type='sigma_min'),
                                dict(algorithm_type='dpmsolver', final_sigmas_type='sigma_min', solver_type='heun', solver_order=3),
                                dict(algorithm_type='dpmsolver', final_sigmas_type='sigma_min', prediction_type='v_prediction', thresholding=True),
                                dict(algorithm_type='dpmsolver', final_sigmas_type='sigma_min', prediction_type='sample')])
def test_parity_options(kw):
    for n in [1, 2, 5, 10, 25]:
        check_loop(*pair(SD, **kw), n)

def test_cosine_karras_repeated_timesteps():
    "Cosine betas + Karras sigmas give repeated (unrounded, truncated) timesteps; diffusers then runs off the end."
    a, b = pair(SD, beta_schedule='squaredcos_cap_v2', use_karras_sigmas=True)
    check_loop(a, b, 2)
    for s in (a, b): s.set_timesteps(5)
    assert_close_finite(a.timesteps, b.timesteps, rtol=0, atol=0)
    assert a.timesteps[0] == a.timesteps[1]
    with pytest.raises(IndexError): run(b, 5, torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match='all 5 steps are done'): run(a, 5, torch.ones(1, 1, 2, 2))

@pytest.mark.parametrize('algorithm_type', ['dpmsolver++', 'dpmsolver'])
def test_learned_variance_keeps_first_three_channels(algorithm_type):
    a, b = pair(CAT, variance_type='learned_range', algorithm_type=algorithm_type, final_sigmas_type='sigma_min')
    model = lambda x, t: torch.cat([toy_model_fn(x, t), -x], dim=1)  # (B, 6, H, W) like ddpm models with learned variance
    check_loop(a, b, 10, shape=(2, 3, 8, 8), model=model)

def test_begin_index_add_noise_and_missing_timestep():
    a, b = pair(SD)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for s in (a, b): s.set_timesteps(20)
    ts = a.timesteps[[5, 7]]
    assert_close_finite(a.add_noise(x0, noise, ts), b.add_noise(x0, noise, ts), rtol=0, atol=0)
    missing = torch.tensor([3, 998])  # not in the schedule: diffusers uses the last step
    assert_close_finite(a.add_noise(x0, noise, missing), b.add_noise(x0, noise, missing), rtol=0, atol=0)
    check_loop(a, b, 20, begin_index=5)

def test_half_precision_tuple_and_round_trip():
    a, b = pair(SD)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    for s in (a, b): s.set_timesteps(5)
    outs = [s.step(toy_model_fn(x, s.timesteps[0]), s.timesteps[0], x, return_dict=False) for s in (a, b)]
    assert len(outs[0]) == 1 and outs[0][0].dtype == torch.float16
    assert_close_finite(outs[0][0], outs[1][0], rtol=0, atol=0)
    with tempfile.TemporaryDirectory() as d:
        a.save_pretrained(d)
        c = diffusers.DPMSolverMultistepScheduler.from_pretrained(d)
        assert {k: v for k, v in c.config.items() if not k.startswith('_')} == {k: v for k, v in a.config.items() if not k.startswith('_')}
    assert len(a) == 1000 and DPMSolverMultistepScheduler in a.compatibles

@pytest.mark.slow
@pytest.mark.parametrize('cfg', [SD, CAT])
def test_full_grid(cfg):
    for pred in ['epsilon', 'v_prediction']:
        for spacing in ['linspace', 'leading', 'trailing']:
            for karras in [False, True]:
                for n in STEPS + [100, 999]:
                    check_loop(*pair(cfg, prediction_type=pred, timestep_spacing=spacing, use_karras_sigmas=karras), n)


def test_bad_input_messages():
    "Moved from nbs/19_dpm_solver: what cannot run raises when built or stepped, with the value named."
    for kw, msg in [(dict(algorithm_type='unipc'), "algorithm_type 'unipc'"),
                    (dict(algorithm_type='dpmsolver'), "use 'sigma_min'"),
                    (dict(prediction_type='x0'), "prediction_type 'x0'"),
                    (dict(beta_schedule='cosine'), "beta_schedule 'cosine'")]:
        with pytest.raises(ValueError, match=msg): DPMSolverMultistepScheduler(**kw)
    s = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match='set_timesteps'): s.step(torch.zeros(1), 999, torch.zeros(1))
    with pytest.raises(ValueError, match='num_inference_steps=1001'): s.set_timesteps(1001)


# --- Lu lambdas, exponential/beta sigmas, SDE variants, custom timesteps (issue 15) ---------------------------------

def run_seeded(s, n, x, seed=0, variance_noise=False, **schedule):
    "A full loop with one seeded generator (or explicit `variance_noise` drawn from it), as the SDE variants need."
    g = torch.Generator().manual_seed(seed)
    s.set_timesteps(n, **schedule)
    x, outs = x * s.init_noise_sigma, []
    for t in s.timesteps:
        kw = dict(variance_noise=torch.randn(x.shape, generator=g)) if variance_noise else dict(generator=g)
        x = s.step(toy_model_fn(s.scale_model_input(x, t), t), t, x, **kw).prev_sample
        outs.append(x)
    return outs

def check_exact(ours, ref, n, **kw):
    "Timesteps, sigmas and every sample of the loop bit for bit equal to diffusers' (and finite)."
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = run_seeded(ours, n, x, **kw), run_seeded(ref, n, x, **kw)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    for p, q in zip(a, b): assert_close_finite(p, q, rtol=0, atol=0)

SIGMA_OPTIONS = [dict(use_lu_lambdas=True), dict(use_lu_lambdas=True, prediction_type='v_prediction'),
                 dict(use_lu_lambdas=True, beta_schedule='squaredcos_cap_v2'), dict(use_exponential_sigmas=True),
                 dict(use_beta_sigmas=True), dict(use_beta_sigmas=True, solver_order=3),
                 dict(use_exponential_sigmas=True, final_sigmas_type='sigma_min', lower_order_final=False)]

@pytest.mark.parametrize('kw', SIGMA_OPTIONS)
@pytest.mark.parametrize('cfg', [SD, CAT])
def test_sigma_options_exact(kw, cfg):
    for n in [1, 2, 5, 10, 25]: check_exact(*pair(cfg, **kw), n)

@pytest.mark.parametrize('algorithm_type, final', [('sde-dpmsolver++', 'zero'), ('sde-dpmsolver++', 'sigma_min'),
                                                   ('sde-dpmsolver', 'sigma_min')])
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('solver_type', ['midpoint', 'heun'])
@pytest.mark.parametrize('pred', ['epsilon', 'v_prediction', 'sample'])
def test_sde_variants_exact(algorithm_type, final, order, solver_type, pred):
    if algorithm_type == 'sde-dpmsolver' and order == 3:
        with pytest.raises(ValueError, match='solver_order 3'): DPMSolverMultistepScheduler(algorithm_type=algorithm_type, final_sigmas_type=final, solver_order=3)
        return
    kw = dict(algorithm_type=algorithm_type, final_sigmas_type=final, solver_order=order, solver_type=solver_type, prediction_type=pred)
    for n in [1, 3, 10, 20]: check_exact(*pair(SD, **kw), n)

def test_sde_variance_noise_and_karras():
    check_exact(*pair(SD, algorithm_type='sde-dpmsolver++'), 10, variance_noise=True)
    check_exact(*pair(CAT, algorithm_type='sde-dpmsolver++', use_karras_sigmas=True), 15)

def test_sde_first_order_is_ddpm_ancestral():
    "First-order SDE-DPM-Solver++ = DDPM's ancestral step: the same mean, and the posterior std on the noise."
    s = DPMSolverMultistepScheduler.from_config(SD, algorithm_type='sde-dpmsolver++', solver_order=1)
    s.set_timesteps(10)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = s.timesteps[3]; s.set_begin_index(3)
    z = torch.randn(1, 4, 8, 8)
    got = s.step(eps, t, x, variance_noise=z).prev_sample
    (a_t, q_t, _), (a_s, q_s, _) = alpha_sigma_lambda(s.sigmas[4]), alpha_sigma_lambda(s.sigmas[3])
    x0 = (x - q_s * eps) / a_s
    ratio = (a_s * q_t / (q_s * a_t)) ** 2
    want = (a_s / a_t) * q_t**2 / q_s**2 * x + a_t * (1 - ratio) * x0 + q_t * (1 - ratio) ** 0.5 * z
    assert_close_finite(got, want, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize('kw', [dict(), dict(algorithm_type='sde-dpmsolver++'), dict(prediction_type='v_prediction'),
                                dict(final_sigmas_type='sigma_min')])
def test_custom_timesteps_exact(kw):
    plain = DPMSolverMultistepScheduler.from_config(SD, **kw); plain.set_timesteps(10)
    check_exact(*pair(SD, **kw), None, timesteps=plain.timesteps.tolist())
    a = DPMSolverMultistepScheduler.from_config(SD, **kw); a.set_timesteps(timesteps=[999, 500, 20])
    assert a.num_inference_steps == 3 and a.timesteps.dtype == torch.int64

@pytest.mark.parametrize('args, kw, msg', [
    (dict(), {}, 'pass exactly one of num_inference_steps, timesteps'),
    (dict(num_inference_steps=10, timesteps=[999, 0]), {}, 'pass exactly one'),
    (dict(timesteps=[999, 0]), dict(use_karras_sigmas=True), 'use_karras_sigmas=True'),
    (dict(timesteps=[999, 0]), dict(use_lu_lambdas=True), 'use_lu_lambdas=True'),
    (dict(timesteps=[999, 0]), dict(use_exponential_sigmas=True), 'use_exponential_sigmas=True')])
def test_custom_timesteps_errors(args, kw, msg):
    with pytest.raises(ValueError, match=msg): DPMSolverMultistepScheduler(**kw).set_timesteps(**args)
    with pytest.raises(ValueError): diffusers.DPMSolverMultistepScheduler(**kw).set_timesteps(**args)
