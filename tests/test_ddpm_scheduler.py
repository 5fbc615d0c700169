"DDPMScheduler: error cases and extra parity cases against diffusers' DDPMScheduler (see nbs/03_ddpm_scheduler)."
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
import diffusers
from minidiff.ddpm_scheduler import DDPMScheduler, ddpm_timesteps
from minidiff.schedule import scheduler_loop, toy_model_fn
from refconfigs import assert_close_finite

CAT_CFG = Path(__file__).parents[1] / 'nbs/configs/google_ddpm-cat-256/scheduler_config.json'
CAT = json.loads(CAT_CFG.read_text())
TOL = dict(rtol=1e-5, atol=1e-6)

def dummy_sample_deter(): return (torch.arange(768).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)

def assert_loops_match(cfg, n, sample=None, model_fn=toy_model_fn, seed=0):
    sample = dummy_sample_deter() * 3 - 1 if sample is None else sample
    ts, xs = scheduler_loop(DDPMScheduler.from_config(cfg), n, sample, model_fn, seed=seed)
    ts_ref, xs_ref = scheduler_loop(diffusers.DDPMScheduler.from_config(cfg), n, sample, model_fn, seed=seed)
    assert torch.equal(ts, ts_ref)
    for i, (a, b) in enumerate(zip(xs, xs_ref)): assert_close_finite(a, b, **TOL, msg=lambda m: f"step {i}: {m}")
    return max((a - b).abs().max().item() for a, b in zip(xs, xs_ref))

# --- timesteps ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('spacing', ['leading', 'linspace', 'trailing'])
@pytest.mark.parametrize('T', [1000, 999, 7])
def test_timesteps_match_diffusers_for_every_n(spacing, T):
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1 if spacing == 'leading' else 0)
    ours = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1 if spacing == 'leading' else 0)
    for n in range(1, T + 1):
        ref.set_timesteps(n); ours.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps), n

def test_cat_timesteps():
    s = DDPMScheduler.from_pretrained(CAT_CFG.parent)
    assert torch.equal(s.timesteps, torch.arange(999, -1, -1))
    s.set_timesteps(50); assert s.timesteps.tolist() == list(range(980, -1, -20))
    s.set_timesteps(25); assert s.timesteps.tolist() == list(range(960, -1, -40))
    s.set_timesteps(1000); assert s.timesteps.tolist() == list(range(999, -1, -1))
    s.set_timesteps(np.int64(10)); assert len(s.timesteps) == 10

def test_set_timesteps_device():
    s = DDPMScheduler(); s.set_timesteps(10, device='cpu')
    assert s.timesteps.device.type == 'cpu' and s.timesteps.dtype == torch.int64

# --- parity: full loops ------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [25, 50, 1000])
def test_cat_config_loops(n):
    assert_loops_match(CAT, n, sample=dummy_sample_deter())

def test_reference_sums_checkpoints_4_5():
    for n, (total, mean) in {50: (257.871185, 0.335770), 25: (253.908569, 0.330610)}.items():
        x = scheduler_loop(DDPMScheduler.from_config(CAT), n, dummy_sample_deter(), toy_model_fn, seed=0)[1][-1]
        assert abs(x.abs().sum().item() - total) < 1e-3 and abs(x.abs().mean().item() - mean) < 1e-6

VARIANTS = [dict(prediction_type='v_prediction'), dict(prediction_type='sample'), dict(variance_type='fixed_large'),
            dict(variance_type='fixed_small_log'), dict(timestep_spacing='linspace'), dict(timestep_spacing='trailing'),
            dict(steps_offset=1), dict(clip_sample=False), dict(clip_sample_range=0.5),
            dict(beta_schedule='squaredcos_cap_v2'), dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012),
            dict(beta_schedule='sigmoid'), dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
            dict(thresholding=True), dict(thresholding=True, sample_max_value=1.2, dynamic_thresholding_ratio=0.9),
            dict(num_train_timesteps=100, timestep_spacing='trailing', prediction_type='v_prediction')]

@pytest.mark.parametrize('kw', VARIANTS, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items())[:60])
@pytest.mark.parametrize('n', [10, 50])
def test_variant_loops(kw, n):
    assert_loops_match({**CAT, **kw}, n)

def test_zero_terminal_snr_loop():
    assert_loops_match({**CAT, 'rescale_betas_zero_snr': True, 'timestep_spacing': 'trailing',
                        'prediction_type': 'v_prediction'}, 50)

def test_zero_terminal_snr_alphas():
    s = DDPMScheduler(rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1] == 0
    assert_close_finite(s.betas, diffusers.DDPMScheduler(rescale_betas_zero_snr=True).betas, rtol=0, atol=0)

def test_learned_variances():
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 3, 8, 8, generator=g)
    def model_fn(x, t): return torch.cat([x * t / (t + 1), torch.tanh(x)], 1)  # (B, 2C, H, W): eps and variance value
    assert_loops_match({**CAT, 'variance_type': 'learned_range'}, 50, sample=sample, model_fn=model_fn)
    def model_fn2(x, t): return torch.cat([x * t / (t + 1), x.abs() * 1e-3 + 1e-4], 1)
    assert_loops_match({**CAT, 'variance_type': 'learned'}, 50, sample=sample, model_fn=model_fn2)

def test_custom_timesteps():
    ts = [999, 800, 650, 300, 120, 5, 0]
    ours, ref = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(timesteps=ts); ref.set_timesteps(timesteps=ts)
    x, y, g1, g2 = dummy_sample_deter(), dummy_sample_deter(), torch.manual_seed(0), None
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        assert ours.previous_timestep(t) == ref.previous_timestep(t)
        x = ours.step(toy_model_fn(x, t), t, x, generator=g1).prev_sample
        y = ref.step(toy_model_fn(y, t), t, y, generator=g2).prev_sample
        assert_close_finite(x, y, **TOL)

def test_training_chain_without_set_timesteps():
    def chain(s):
        x, g = dummy_sample_deter(), torch.Generator().manual_seed(0)
        for t in reversed(range(len(s))): x = s.step(toy_model_fn(x, t), t, x, generator=g).prev_sample
        return x
    x, y = chain(DDPMScheduler()), chain(diffusers.DDPMScheduler())
    assert_close_finite(x, y, **TOL)
    assert abs(x.abs().sum().item() - 258.9606) < 1e-2

def test_step_outputs_and_tuple():
    s, r = DDPMScheduler(), diffusers.DDPMScheduler()
    x = dummy_sample_deter(); eps = toy_model_fn(x, 500)
    a = s.step(eps, 500, x, generator=torch.Generator().manual_seed(1))
    b = r.step(eps, 500, x, generator=torch.Generator().manual_seed(1))
    assert_close_finite(a.prev_sample, b.prev_sample, **TOL)
    assert_close_finite(a.pred_original_sample, b.pred_original_sample, **TOL)
    prev, x0 = s.step(eps, torch.tensor(500), x, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert_close_finite(prev, b.prev_sample, **TOL)
    last = s.step(eps, 0, x)  # t = 0 draws no noise: deterministic without a generator
    assert_close_finite(last.prev_sample, r.step(eps, 0, x).prev_sample, **TOL)

def test_step_fp16_and_float64_dtypes():
    for dtype in (torch.float16, torch.float64):
        x = dummy_sample_deter().to(dtype); eps = toy_model_fn(x, 300)
        a = DDPMScheduler().step(eps, 300, x, generator=torch.Generator().manual_seed(0)).prev_sample
        b = diffusers.DDPMScheduler().step(eps, 300, x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert a.dtype == b.dtype == dtype
        assert_close_finite(a, b, rtol=0, atol=0)

def test_add_noise_and_velocity():
    ours, ref = DDPMScheduler(), diffusers.DDPMScheduler()
    x0 = dummy_sample_deter(); eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    for ts in (torch.tensor([0, 10, 500, 999]), torch.tensor(250), torch.tensor([7])):
        assert_close_finite(ours.add_noise(x0, eps, ts), ref.add_noise(x0, eps, ts), **TOL)
        assert_close_finite(ours.get_velocity(x0, eps, ts), ref.get_velocity(x0, eps, ts), **TOL)
    assert_close_finite(ours.add_noise(x0, eps, 250), ref.add_noise(x0, eps, torch.tensor(250)), **TOL)
    h = ours.add_noise(x0.half(), eps.half(), torch.tensor([1, 2, 3, 4]))
    assert h.dtype == torch.float16
    assert_close_finite(h, ref.add_noise(x0.half(), eps.half(), torch.tensor([1, 2, 3, 4])), rtol=0, atol=0)

def test_misc_api():
    s = DDPMScheduler()
    x = torch.randn(1, 3, 4, 4)
    assert s.scale_model_input(x, 10) is x and s.init_noise_sigma == 1.0 and len(s) == 1000 and s.order == 1
    assert DDPMScheduler in s.compatibles

def test_from_pretrained_real_config_and_round_trip(tmp_path):
    shutil.copy(CAT_CFG, tmp_path)
    s = DDPMScheduler.from_pretrained(tmp_path)
    ref = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    for k, v in ref.config.items():
        if not k.startswith('_'): assert s.config[k] == v, k
    assert_close_finite(s.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    s2 = DDPMScheduler.from_pretrained(tmp_path, prediction_type='v_prediction')
    assert s2.config.prediction_type == 'v_prediction'
    s2.save_pretrained(tmp_path / 'saved')
    saved = json.loads((tmp_path / 'saved' / 'scheduler_config.json').read_text())
    assert saved['_class_name'] == 'DDPMScheduler' and saved['prediction_type'] == 'v_prediction'
    assert diffusers.DDPMScheduler.from_pretrained(tmp_path / 'saved').config.prediction_type == 'v_prediction'
    assert DDPMScheduler.from_pretrained(tmp_path / 'saved').config.prediction_type == 'v_prediction'

def test_from_config_of_other_scheduler_configs():
    sd = json.loads((CAT_CFG.parents[1] / 'runwayml_stable-diffusion-v1-5/scheduler/scheduler_config.json').read_text())
    assert_loops_match(sd, 25)
    # a saved DPMSolver config says variance_type null; diffusers' DDPM then gives fixed_small's numbers
    dpm = {k: v for k, v in diffusers.DPMSolverMultistepScheduler().config.items() if k != '_use_default_values'}
    assert dpm['variance_type'] is None and DDPMScheduler.from_config(dpm).config.variance_type is None
    assert_loops_match(dpm, 20)
    assert_loops_match(diffusers.DPMSolverMultistepScheduler().config, 20)

# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kw, msg', [
    (dict(beta_schedule='cosine'), "unknown beta_schedule 'cosine'"),
    (dict(timestep_spacing='uniform'), "unknown timestep_spacing 'uniform'"),
    (dict(prediction_type='noise'), "unknown prediction_type 'noise'"),
    (dict(variance_type='small'), "unknown variance_type 'small'"),
    (dict(variance_type='fixed_large_log'), "unknown variance_type 'fixed_large_log'")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg): DDPMScheduler(**kw)

def test_set_timesteps_errors_leave_state():
    s = DDPMScheduler(); s.set_timesteps(10); before = s.timesteps.clone()
    for bad, exc, msg in [(1001, ValueError, 'num_inference_steps=1001'), (0, ValueError, 'num_inference_steps=0'),
                          (-3, ValueError, 'num_inference_steps=-3'), (50.0, TypeError, 'must be an int'),
                          (True, TypeError, 'must be an int'), ('50', TypeError, 'must be an int')]:
        with pytest.raises(exc, match=msg): s.set_timesteps(bad)
        assert torch.equal(s.timesteps, before) and s.num_inference_steps == 10
    with pytest.raises(ValueError, match='exactly one'): s.set_timesteps()
    with pytest.raises(ValueError, match='exactly one'): s.set_timesteps(10, timesteps=[5, 0])
    for bad in ([5, 10], [1000, 5], [5, 5], [3, -1], []):
        with pytest.raises(ValueError, match='descending'): s.set_timesteps(timesteps=bad)
    assert torch.equal(s.timesteps, before)

def test_step_errors():
    s = DDPMScheduler(); x = torch.randn(1, 3, 4, 4)
    with pytest.raises(TypeError, match='model_output must be a torch.Tensor'): s.step(x.numpy(), 10, x)
    with pytest.raises(TypeError, match='sample must be a torch.Tensor'): s.step(x, 10, [1.0])
    with pytest.raises(ValueError, match=r'model_output shape \(1, 6, 4, 4\) does not match'): s.step(torch.cat([x, x], 1), 10, x)
    with pytest.raises(ValueError, match='timestep 1000 is outside'): s.step(x, 1000, x)
    with pytest.raises(ValueError, match='timestep -1 is outside'): s.step(x, -1, x)
    with pytest.raises(TypeError, match='timestep must be an int'): s.step(x, 10.5, x)
    with pytest.raises(TypeError, match='timestep must be an int'): s.step(x, torch.tensor(10.0), x)
    s.set_timesteps(50)
    with pytest.raises(ValueError, match='timestep 981 is not one'): s.step(x, 981, x)
    learned = DDPMScheduler(variance_type='learned_range')
    with pytest.raises(ValueError, match="variance_type='learned_range' needs 6 model_output channels, got 3"): learned.step(x, 10, x)

def test_add_noise_errors():
    s = DDPMScheduler(); x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match='outside'): s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match='outside'): s.add_noise(x, x, -1)
    with pytest.raises(TypeError, match='integers'): s.add_noise(x, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match='noise must be a torch.Tensor'): s.add_noise(x, None, 3)

@pytest.mark.slow
@pytest.mark.parametrize('kw', [{}, dict(prediction_type='v_prediction'), dict(variance_type='fixed_large')])
def test_full_size_1000_steps_batch(kw):
    sample = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert_loops_match({**CAT, **kw}, 1000, sample=sample)

# --- moved from nbs/03_ddpm_scheduler: spacings, bad step counts and timesteps, variance names ------------

def test_notebook_timesteps_and_errors():
    test = DDPMScheduler
    assert ddpm_timesteps(25)[[0, -1]].tolist() == [960, 0] and ddpm_timesteps(1000)[[0, -1]].tolist() == [999, 0]
    assert ddpm_timesteps(50, timestep_spacing='trailing')[[0, -1]].tolist() == [999, 19]
    assert ddpm_timesteps(4, timestep_spacing='linspace').tolist() == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"): ddpm_timesteps(10, timestep_spacing='uniform')
    s = test()
    assert len(s) == 1000 and s.timesteps[[0, -1]].tolist() == [999, 0]
    s.set_timesteps(50)
    assert s.timesteps[:3].tolist() == [980, 960, 940] and s.timesteps.dtype == torch.int64
    for n, msg in [(1001, 'num_inference_steps=1001'), (0, 'num_inference_steps=0')]:
        with pytest.raises(ValueError, match=msg): s.set_timesteps(n)
    with pytest.raises(TypeError, match='must be an int'): s.set_timesteps(50.0)
    assert len(s.timesteps) == 50                       # a refused call leaves the schedule as it was
    with pytest.raises(ValueError, match='timestep 981 is not one'): s.previous_timestep(981)
    with pytest.raises(ValueError, match='descending'): s.set_timesteps(timesteps=[5, 10])
    with pytest.raises(ValueError, match="unknown variance_type 'small'"): test(variance_type='small')


def test_notebook_prediction_and_variance_errors():
    from minidiff.ddpm_scheduler import predict_original_sample, posterior_std
    ab = DDPMScheduler().alphas_cumprod
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'"):
        predict_original_sample(torch.zeros(1), torch.zeros(1), ab[600], 'noise')
    with pytest.raises(ValueError, match="unknown variance_type 'tiny'"): posterior_std(ab[5], ab[4], 'tiny')


def test_fixed_large_variance_never_nan():
    "beta_t = 1 - alpha_bar_t / alpha_bar_prev is clamped at 0: equal alpha_bars give no noise, not NaN."
    from minidiff.ddpm_scheduler import posterior_std
    ab = torch.tensor(0.5)
    prev = torch.nextafter(ab, torch.tensor(0.0))                    # one float32 below: the ratio is just above 1
    assert 1 - ab / prev < 0 and posterior_std(ab, prev, 'fixed_large') == 0
