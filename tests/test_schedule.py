"minidiff.schedule: the checks moved out of nbs/02_schedule (error messages, sweeps), and the shared scheduler pieces."
import math
import numpy as np
import pytest, torch
from minidiff.schedule import (check_choice, check_num_inference_steps, spaced_timesteps, unipc_timesteps,
                               threshold_sample, train_schedule, sigmas_from_alphas_cumprod, sigmas_at,
                               sigma_to_alpha_sigma_t, sigma_to_lambda, karras_sigmas, convert_model_output,
                               sigma_x0_pred, config_or, index_for_timestep, StepIndexMixin, TIMESTEP_SPACINGS)


def test_check_choice_and_num_inference_steps():
    check_choice('timestep_spacing', 'trailing', TIMESTEP_SPACINGS)
    check_num_inference_steps(50, 1000)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be between 1 and num_train_timesteps=1000"):
        check_num_inference_steps(0, 1000)
    with pytest.raises(TypeError, match="must be an int, got 2.5"): check_num_inference_steps(2.5, 1000)
    with pytest.raises(TypeError, match="must be an int, got True"): check_num_inference_steps(True, 1000)


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 4, 'linspace').tolist() == [999, 666, 333, 0]
    assert spaced_timesteps(1000, 50, 'trailing')[[0, -1]].tolist() == [999, 19]
    with pytest.raises(ValueError, match="num_inference_steps=0"): spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"): spaced_timesteps(1000, 10, 'uniform')


def test_unipc_timesteps():
    assert unipc_timesteps(3).tolist() == [999, 666, 333]
    assert unipc_timesteps(25)[[0, 1, 2, -1]].tolist() == [999, 959, 919, 40]
    assert unipc_timesteps(3, timestep_spacing='leading', steps_offset=1).tolist() == [751, 501, 251]
    assert unipc_timesteps(3, timestep_spacing='trailing').tolist() == [999, 666, 332]
    assert unipc_timesteps(4, last_timestep=800).tolist() == [799, 599, 400, 200]
    with pytest.raises(ValueError, match="timestep_spacing 'even'"): unipc_timesteps(3, timestep_spacing='even')


def test_threshold_sample():
    x = torch.linspace(-3, 3, 1000).reshape(1, 1, 10, 100)
    y = threshold_sample(x, max_value=2.0)
    torch.testing.assert_close(y[0, 0, 5, 0], x[0, 0, 5, 0] / 2)
    assert threshold_sample(x.half(), max_value=2.0).dtype == torch.float16


def test_sigmas_and_lambda():
    _, ab = train_schedule(1000, 0.00085, 0.012, 'scaled_linear')
    sig = sigmas_from_alphas_cumprod(ab)
    assert sigma_to_lambda(torch.tensor(0.)) == math.inf
    np.testing.assert_allclose(sigmas_at(ab, [0, 999, 500.5]),
                               [sig[0].item(), sig[-1].item(), (sig[500].item() + sig[501].item()) / 2], rtol=1e-7)
    assert train_schedule(rescale_betas_zero_snr=True)[1][-1].item() == 2**-24
    assert train_schedule(rescale_betas_zero_snr=True, terminal_alpha_bar=None)[1][-1].item() == 0
    assert (np.diff(karras_sigmas(sig[0].item(), sig[-1].item(), 10)) < 0).all()


@pytest.mark.parametrize("pt", ['epsilon', 'sample', 'v_prediction'])
def test_convert_model_output_and_sigma_x0_pred(pt):
    x0, eps, sigma = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, 4, 4), torch.tensor(0.7)
    a, s = sigma_to_alpha_sigma_t(sigma)
    xt, v = a * x0 + s * eps, a * eps - s * x0
    out = {'epsilon': eps, 'sample': x0, 'v_prediction': v}[pt]
    torch.testing.assert_close(convert_model_output(out, xt, sigma, pt), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(convert_model_output(out, xt, sigma, pt, predict_x0=False), eps, rtol=0, atol=1e-5)
    ve_out = {'epsilon': eps, 'sample': x0, 'v_prediction': v}[pt]   # the model sees x / sqrt(sigma^2 + 1) = x_t
    torch.testing.assert_close(sigma_x0_pred(ve_out, xt / a, sigma, pt), x0, rtol=0, atol=1e-5)


def test_prediction_type_errors():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="prediction_type 'flow'"): convert_model_output(x, x, torch.tensor(1.), 'flow')
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"): sigma_x0_pred(x, x, torch.tensor(1.), 'x0')


def test_config_or():
    assert config_or({'sigma_min': 0.1}, 'sigma_min', 0.03) == 0.1
    assert config_or({'sigma_min': None}, 'sigma_min', 0.03) == 0.03
    assert config_or({}, 'sigma_max', 14.6) == 14.6


def test_index_for_timestep():
    ts = torch.tensor([999, 959, 959, 0])
    assert index_for_timestep(959, ts) == 2 and index_for_timestep(999, ts) == 0
    assert index_for_timestep(5, ts, missing=3) == 3
    with pytest.raises(ValueError, match="timestep 5 is not one of this scheduler's timesteps"): index_for_timestep(5, ts)


def test_step_index_mixin():
    class Counter(StepIndexMixin): timesteps, _step_index, _begin_index = torch.tensor([999, 500, 0]), None, None
    c = Counter()
    c.set_begin_index(3)
    assert (c.step_index, c.begin_index) == (None, 3)
    assert c.index_for_timestep(7) == 2              # missing: the last step, as diffusers' multistep solvers
    c.strict_timesteps = True
    with pytest.raises(ValueError, match="timestep 7 is not one"): c.index_for_timestep(7)
    c2 = Counter(); c2._init_step_index(torch.tensor(500))
    assert c2.step_index == 1
