"LMSDiscreteScheduler: coefficients, error messages, state, extra parity cases against diffusers."
import functools, math, warnings
import numpy as np
import pytest, torch
import diffusers.schedulers.scheduling_lms_discrete as lms_ref
from minidiff.lms import LMSDiscreteScheduler, gauss_legendre, lms_coefficient
from minidiff.schedule import beta_ppf
from minidiff.schedule import scheduler_loop, toy_model_fn

from refconfigs import SD, CAT, assert_close_finite


Ref = lms_ref.LMSDiscreteScheduler
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2


def pair(config, n=None, **kwargs):
    ours, ref = LMSDiscreteScheduler.from_config(config, **kwargs), Ref.from_config(config, **kwargs)
    if n is not None:
        for s in (ours, ref): s.set_timesteps(n)
    return ours, ref


def assert_loops_close(ours, ref, n, x_T=None, **step_kwargs):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(n)) if x_T is None else x_T
    for s in (ours, ref): s.step = functools.partial(s.step, **step_kwargs)
    (ts, xs), (ts_ref, xs_ref) = [scheduler_loop(s, n, x_T, toy_model_fn) for s in (ours, ref)]
    assert torch.equal(ts, ts_ref) and torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))
    scales = torch.stack([x.abs().max() for x in (x_T * ref.init_noise_sigma, *xs_ref)]).cummax(0).values[1:]
    for x, x_ref, scale in zip(xs, xs_ref, scales, strict=True):  # atol: 1e-5 of the largest sample so far
        assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-5 * scale.item())


@pytest.mark.parametrize("config", [SD, CAT], ids=["sd", "cat"])
@pytest.mark.parametrize("kw", [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                                dict(timestep_spacing='leading'), dict(timestep_spacing='trailing'),
                                dict(prediction_type='sample'), dict(prediction_type='v_prediction', use_karras_sigmas=True)])
def test_parity_options(config, kw):
    for n in (1, 4, 20):
        assert_loops_close(*pair(config, **kw), n)


def test_parity_orders():
    for order in (1, 2, 3, 5):
        assert_loops_close(*pair(SD), 12, order=order)


def test_coefficients_exact_and_against_diffusers():
    for config in (SD, CAT):
        ours, ref = pair(config, 50)
        ref64 = Ref.from_config(config); ref64.set_timesteps(50); ref64.sigmas = ref64.sigmas.double()
        for t in range(50):
            order = min(t + 1, 4)
            for j in range(order):
                c, c_ref, c_ref64 = (s.get_lms_coefficient(order, t, j) for s in (ours, ref, ref64))
                assert abs(c - c_ref) <= 1e-6 * abs(c_ref)      # diffusers evaluates its integrand in float32
                assert abs(c - c_ref64) <= 1e-12 * abs(c_ref64)  # same integrand in float64: only rounding is left


def test_gauss_legendre_exactness():
    for m in range(1, 7):
        nodes, weights = gauss_legendre(m)
        assert nodes.dtype == torch.float64 and abs(weights.sum().item() - 2) < 1e-14
        for p in range(2 * m):
            assert abs((weights * nodes ** p).sum().item() - (2 / (p + 1) if p % 2 == 0 else 0)) < 1e-13


def test_begin_index_and_add_noise():
    ours, ref = pair(SD, 20)
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ours.timesteps[[3, 7]]
    assert_close_finite(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), rtol=0, atol=0)
    for s in (ours, ref): s.set_begin_index(5)  # img2img: start 5 steps down the schedule
    starts = [s.add_noise(x, noise, s.timesteps[5:6]) for s in (ours, ref)]
    assert_close_finite(starts[0], starts[1], rtol=0, atol=0)
    outs = []
    for s, x_t in zip((ours, ref), starts):
        for t in s.timesteps[5:]:
            x_t = s.step(toy_model_fn(s.scale_model_input(x_t, t), t), t, x_t).prev_sample
        outs.append(x_t)
    assert_close_finite(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert ours.step_index == 20


def test_return_tuple_and_pred_original_sample():
    ours, ref = pair(CAT, 10)
    x = torch.randn(1, 3, 4, 4)
    t = ours.timesteps[0]
    a = ours.step(x * 0.3, t, ours.scale_model_input(x, t), return_dict=False)
    b = ref.step(x * 0.3, t, ref.scale_model_input(x, t), return_dict=False)
    assert isinstance(a, tuple) and len(a) == 2
    for u, v in zip(a, b): assert_close_finite(u, v, rtol=1e-6, atol=1e-6)


def test_works_without_set_timesteps_like_diffusers():
    s = LMSDiscreteScheduler()
    assert s.num_inference_steps == 1000 and s.timesteps[0] == 999 and len(s.sigmas) == 1001 and len(s) == 1000
    x = torch.ones(1)
    s.step(x, s.timesteps[0], s.scale_model_input(x, s.timesteps[0]))
    assert s.step_index == 1


def test_warns_without_scale_model_input():
    s = LMSDiscreteScheduler()
    s.set_timesteps(5)
    with pytest.warns(UserWarning, match="scale_model_input"): s.step(torch.ones(1), s.timesteps[0], torch.ones(1))
    s.set_timesteps(5); s.scale_model_input(torch.ones(1), s.timesteps[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.step(torch.ones(1), s.timesteps[0], torch.ones(1))


def test_step_past_the_end():
    s = LMSDiscreteScheduler()
    s.set_timesteps(2)
    x = torch.ones(1)
    for t in s.timesteps: x = s.step(x, t, s.scale_model_input(x, t)).prev_sample
    with pytest.raises(ValueError, match="all 2 steps are done: call set_timesteps"): s.step(x, s.timesteps[-1], x)


def test_unknown_timestep():
    s = LMSDiscreteScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 500.5 is not one of this scheduler's timesteps"):
        s.scale_model_input(torch.ones(1), 500.5)


def test_bad_order_and_coefficient_args():
    s = LMSDiscreteScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="order must be at least 1, got 0"): s.step(torch.ones(1), s.timesteps[0], torch.ones(1), order=0)
    with pytest.raises(ValueError, match="current_order=0, order=3, t=0"): lms_coefficient(s.sigmas, 3, 0, 0)


@pytest.mark.parametrize("n", [0, -1, 1001])
def test_bad_num_inference_steps_keeps_state(n):
    s = LMSDiscreteScheduler()
    s.set_timesteps(10)
    before = (s.timesteps.clone(), s.sigmas.clone())
    with pytest.raises(ValueError, match=f"num_inference_steps={n} must be between 1 and num_train_timesteps=1000"):
        s.set_timesteps(n)
    assert torch.equal(s.timesteps, before[0]) and torch.equal(s.sigmas, before[1]) and s.num_inference_steps == 10


@pytest.mark.parametrize("key,value", [("beta_schedule", "cosine"), ("timestep_spacing", "uniform"),
                                       ("prediction_type", "x0")])
def test_unknown_config_values(key, value):
    with pytest.raises(ValueError, match=f"unknown {key} '{value}'"): LMSDiscreteScheduler(**{key: value})


def test_sigma_options_rejected():
    with pytest.raises(ValueError, match="only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas"):
        LMSDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="only one of"): LMSDiscreteScheduler(use_beta_sigmas=True, use_karras_sigmas=True)


def _midpoint_beta_cdf(x, a, b, n=400_000):
    "Independent Beta CDF: (1/a) integral_0^(x^a) (1 - t^(1/a))^(b-1) dt / B(a, b), midpoint rule (x <= 1/2)."
    t = (np.arange(n) + 0.5) / n * x ** a
    return ((1 - t ** (1 / a)) ** (b - 1)).sum() * x ** a / n / a * np.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 2.0), (2.0, 0.7), (1.0, 1.0)])
def test_beta_ppf(a, b):
    u = np.linspace(0, 1, 21)
    q = beta_ppf(u, a, b)
    assert q[0] == 0 and q[-1] == 1 and (np.diff(q) > 0).all()
    for ui, qi in zip(u[1:-1], q[1:-1]):  # F(F^-1(u)) = u, the lower half directly, the upper half by symmetry
        got = _midpoint_beta_cdf(qi, a, b) if qi <= 0.5 else 1 - _midpoint_beta_cdf(1 - qi, b, a)
        assert abs(got - ui) < 1e-5
    import scipy.stats
    np.testing.assert_allclose(q, scipy.stats.beta.ppf(u, a, b), rtol=0, atol=1e-13)


def test_beta_sigmas_schedule():
    s = LMSDiscreteScheduler.from_config(SD, use_beta_sigmas=True)
    s.set_timesteps(25)
    sig = s.sigmas[:-1].double()
    assert len(s.timesteps) == 25 and s.timesteps[0] == 999 and (s.timesteps.diff() < 0).all()
    plain = LMSDiscreteScheduler.from_config(SD)
    plain.set_timesteps(25)
    assert_close_finite(sig[[0, -1]], plain.sigmas[[0, -2]].double(), rtol=1e-7, atol=0)  # same range
    mid = (sig[12] - sig[-1]) / (sig[0] - sig[-1])  # the Beta(0.6, 0.6) median is 1/2
    assert abs(mid.item() - 0.5) < 1e-6
    assert_loops_close(*pair(SD, use_beta_sigmas=True), 10)


def test_init_noise_sigma_by_spacing(tmp_path):
    for spacing in ('linspace', 'leading', 'trailing'):
        ours, ref = pair(SD, 30, timestep_spacing=spacing)
        assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))
    ours.save_pretrained(tmp_path)
    assert LMSDiscreteScheduler.from_pretrained(tmp_path).config.timestep_spacing == 'trailing'
    assert LMSDiscreteScheduler in ours.compatibles and np.isclose(float(pair(SD, 25)[0].init_noise_sigma), 14.6146, atol=1e-4)


def test_sd_config_sigmas_scaling_and_add_noise():
    "Moved from nbs/17_lms: the final sigma, the input scaling and the forward process with SD's config."
    lms = LMSDiscreteScheduler.from_config(SD)
    lms.set_timesteps(25)
    assert len(lms.sigmas) == 26 and lms.sigmas[-1] == 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lms.scale_model_input(x, lms.timesteps[0]), x / (lms.sigmas[0] ** 2 + 1).sqrt())
    torch.testing.assert_close(lms.add_noise(torch.zeros(1), torch.ones(1), lms.timesteps[:1]), lms.sigmas[:1])
