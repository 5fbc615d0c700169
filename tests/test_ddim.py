"DDIMScheduler: error messages, state safety, extra parity cases against diffusers."
import functools
import pytest, torch
import diffusers
from minidiff.ddim import DDIMScheduler
from minidiff.schedule import scheduler_loop, spaced_timesteps, toy_model_fn

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

from refconfigs import SD, CAT, assert_close_finite

ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing='trailing', prediction_type='v_prediction')


def dummy_sample_deter():
    "diffusers' tests/schedulers harness sample: (4, 3, 8, 8) in [0, 1)."
    return (torch.arange(768).reshape(3, 8, 8, 4) / 768).permute(3, 0, 1, 2)


def loops(config, n, eta=0.0, seed=0, step_kwargs={}, **kwargs):
    out = []
    for cls in (DDIMScheduler, diffusers.DDIMScheduler):
        s = cls.from_config(config, **kwargs)
        s.step = functools.partial(s.step, eta=eta, **step_kwargs)
        out.append(scheduler_loop(s, n, dummy_sample_deter(), toy_model_fn, seed=seed))
    return out


def test_sd_reference_numbers():
    "SD v1.5's config, DDIM 50 steps in diffusers' scheduler-test harness (sum and mean computed with diffusers 0.42.1)."
    (ts, xs), _ = loops(SD, 50)
    assert ts.tolist()[:2] == [981, 961] and ts[-1] == 1 and len(ts) == 50
    assert xs[-1].abs().sum().item() == pytest.approx(197.979019, abs=1e-4)
    assert xs[-1].abs().mean().item() == pytest.approx(0.257785, abs=1e-6)


@pytest.mark.parametrize("config", [SD, CAT], ids=["sd", "cat"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_parity_spacings(config, spacing, pt):
    for n in (1, 7, 20):
        (ts, xs), (ts_ref, xs_ref) = loops(config, n, eta=0.7, timestep_spacing=spacing, prediction_type=pt)
        assert torch.equal(ts, ts_ref)
        for x, x_ref in zip(xs, xs_ref, strict=True):
            assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)


def test_parity_options():
    "Options over 10-step loops; zero terminal SNR at eta=1 is `test_zero_snr_eta_one_stays_finite` (NaN in diffusers)."
    for kw, eta in [(dict(thresholding=True, sample_max_value=2.0), 1.0), (ZERO_SNR, 0.0), (ZERO_SNR, 0.5),
                    (dict(beta_schedule='squaredcos_cap_v2'), 1.0), (dict(set_alpha_to_one=False), 1.0),
                    (dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()), 1.0)]:
        (ts, xs), (ts_ref, xs_ref) = loops(CAT, 10, eta=eta, **kw)
        for x, x_ref in zip(xs, xs_ref, strict=True):
            assert_close_finite(x, x_ref, rtol=1e-5, atol=1e-6)
    (_, xs), (_, xs_ref) = loops(CAT, 10, eta=1.0, step_kwargs=dict(use_clipped_model_output=True))
    assert_close_finite(xs[-1], xs_ref[-1], rtol=1e-5, atol=1e-6)


def test_variance_noise_and_add_noise():
    ours, ref = DDIMScheduler.from_config(CAT), diffusers.DDIMScheduler.from_config(CAT)
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for s in (ours, ref): s.set_timesteps(10)
    a = ours.step(x * 0.1, ours.timesteps[2], x, eta=0.5, variance_noise=noise)
    b = ref.step(x * 0.1, ref.timesteps[2], x, eta=0.5, variance_noise=noise)
    assert_close_finite(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-6)
    assert_close_finite(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-6)
    prev, x0 = ours.step(x * 0.1, ours.timesteps[2], x, return_dict=False)
    assert torch.equal(prev, ours.step(x * 0.1, ours.timesteps[2], x).prev_sample)
    t = torch.tensor([10, 500])
    assert_close_finite(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), rtol=1e-6, atol=1e-6)
    assert len(ours) == 1000 and ours.init_noise_sigma == 1.0 and ours.scale_model_input(x, 3) is x


def test_step_before_set_timesteps():
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="call set_timesteps"): s.step(torch.zeros(1), 999, torch.zeros(1))


@pytest.mark.parametrize("n", [0, -3, 1001])
def test_bad_num_inference_steps_keeps_state(n):
    s = DDIMScheduler()
    s.set_timesteps(10)
    before = s.timesteps.clone()
    with pytest.raises(ValueError, match=f"num_inference_steps={n} must be between 1 and num_train_timesteps=1000"):
        s.set_timesteps(n)
    assert torch.equal(s.timesteps, before) and s.num_inference_steps == 10


def test_non_int_num_inference_steps():
    with pytest.raises(TypeError, match="num_inference_steps must be an int"): DDIMScheduler().set_timesteps(2.5)


@pytest.mark.parametrize("key,value", [("beta_schedule", "cosine"), ("timestep_spacing", "uniform"),
                                       ("prediction_type", "x0")])
def test_unknown_config_values(key, value):
    with pytest.raises(ValueError, match=f"unknown {key} '{value}'"): DDIMScheduler(**{key: value})


def test_generator_and_variance_noise_together():
    s = DDIMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        s.step(torch.zeros(1), s.timesteps[0], torch.zeros(1), eta=1.0, generator=torch.Generator(),
               variance_noise=torch.zeros(1))


def test_timestep_out_of_range():
    s = DDIMScheduler()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match=r"timestep 1000 is outside \[0, 1000\)"): s.step(torch.zeros(1), 1000, torch.zeros(1))


def test_from_config_and_compatibles(tmp_path):
    s = DDIMScheduler.from_config(SD)
    assert s.config.skip_prk_steps is True and s.config.steps_offset == 1
    s.save_pretrained(tmp_path)
    assert DDIMScheduler.from_pretrained(tmp_path).config.set_alpha_to_one is False
    assert DDIMScheduler in s.compatibles
    assert spaced_timesteps(1000, 50, 'leading', 1)[0] == 981


def test_python_int_timestep_and_cross_from_config():
    s = DDIMScheduler.from_config(SD)
    s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    a = s.step(x * 0.5, int(s.timesteps[3]), x).prev_sample
    assert torch.equal(a, s.step(x * 0.5, s.timesteps[3], x).prev_sample)
    # a config round trip through another scheduler keeps DDIM's own defaults for keys the file did not set
    from minidiff.lms import LMSDiscreteScheduler
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as RefLMS  # importable without scipy
    lms = LMSDiscreteScheduler.from_config(s.config)
    ref = RefLMS.from_config(
        diffusers.DDIMScheduler.from_config(SD).config)
    assert lms.config.timestep_spacing == ref.config.timestep_spacing == 'linspace'
    back = DDIMScheduler.from_config(lms.config)
    assert back.config.timestep_spacing == 'leading' and back.config.steps_offset == 1 and back.config.set_alpha_to_one is False



@pytest.mark.parametrize("config", [SD, CAT], ids=["sd", "cat"])
@pytest.mark.parametrize("n", [7, 10, 20])
def test_zero_snr_eta_one_stays_finite(config, n):
    "Zero terminal SNR + v_prediction + trailing + eta=1: finite at every step, equal to diffusers wherever it is finite."
    ours, ref = (cls.from_config(config, **ZERO_SNR) for cls in (DDIMScheduler, diffusers.DDIMScheduler))
    for s in (ours, ref): s.set_timesteps(n)
    x, g, compared = dummy_sample_deter(), torch.Generator().manual_seed(0), 0
    for t in ours.timesteps:   # both step from our sample, so one NaN step of diffusers' does not hide the others
        noise, out = torch.randn(x.shape, generator=g), toy_model_fn(x, t)
        a = ours.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        b = ref.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        assert torch.isfinite(a).all(), f"NaN/inf at t={int(t)}"
        if torch.isfinite(b).all():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6); compared += 1
        x = a
    assert compared >= n - 1   # only the first step (alpha_bar_t = 0) can be non-finite in diffusers


def test_direction_weight_clamped_at_zero():
    "Where `1 - alpha_bar_prev - sigma_t**2` rounds below 0 on this CPU, the step uses weight 0 for eps, not NaN."
    from minidiff.ddim import ddim_variance
    zero = torch.tensor(0.0)
    negative = [ab for ab in torch.linspace(0.05, 0.95, 300)
                if 1 - ab - (1.0 * ddim_variance(zero, ab) ** 0.5) ** 2 < 0]   # 0 in exact arithmetic
    assert negative, "no alpha_bar_prev rounds below zero here: the check below would prove nothing"
    s = DDIMScheduler(clip_sample=False, **ZERO_SNR)
    s.set_timesteps(10)
    t, prev_t = 999, 999 - 100
    s.alphas_cumprod[prev_t] = ab_prev = negative[0]
    x, noise = dummy_sample_deter(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = s.step(0.5 * x, t, x, eta=1.0, variance_noise=noise)
    sigma_t = ddim_variance(zero, ab_prev) ** 0.5
    assert torch.isfinite(out.prev_sample).all()
    torch.testing.assert_close(out.prev_sample, ab_prev ** 0.5 * out.pred_original_sample + sigma_t * noise,
                               rtol=0, atol=0)
