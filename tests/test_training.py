"The training loop: it runs, the loss falls, runs are reproducible; the lr schedule and EMA behave."
import math
import pytest, torch
from minidiff import UNet2DModel, DDPMScheduler
from minidiff.shapes import shapes_batch
from minidiff.training import ddpm_loss, fit, cosine_schedule, EMA, smooth, min_snr_weights, prediction_target
from minidiff.train_vae import train_vae
from minidiff.train_ddpm import train_ddpm
from minidiff.train_sd import drop_captions

def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                       down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'))

def run(steps=40):
    unet, scheduler, gen = tiny_unet(), DDPMScheduler(), torch.Generator().manual_seed(0)
    def loss_fn(step): return ddpm_loss(unet, scheduler, shapes_batch(16, seed=step, size=16).images * 2 - 1, gen)
    return fit([unet], loss_fn, steps, lr=3e-3, warmup=5, progress=False)

def test_ddpm_loop_runs_and_the_loss_falls():
    res = run()
    assert all(math.isfinite(l) for l in res.losses)
    assert sum(res.losses[-10:]) < 0.8 * sum(res.losses[:10])

def test_runs_are_reproducible():
    a, b = run(6), run(6)
    assert a.losses == b.losses
    for p, q in zip(a.ema_models[0].parameters(), b.ema_models[0].parameters()): assert torch.equal(p, q)

def test_micro_vae_loss_falls():
    vae, losses = train_vae(steps=12, progress=False)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]

def test_micro_ddpm_trains_a_few_steps():
    unet, scheduler, losses = train_ddpm(steps=2, batch_size=8, progress=False)
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    assert unet.config.sample_size == 32 and scheduler.config.beta_schedule == 'linear'

class Oracle(torch.nn.Module):
    "A perfect noise predictor: recovers eps from x_t, knowing x0."
    def __init__(self, scheduler, x0): super().__init__(); self.scheduler, self.x0 = scheduler, x0
    def forward(self, x_t, t):
        ab = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        return type('Out', (), {'sample': (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()})

def test_ddpm_loss_of_a_perfect_model_is_zero():
    scheduler, x0 = DDPMScheduler(), torch.randn(4, 3, 8, 8)
    assert ddpm_loss(Oracle(scheduler, x0), scheduler, x0, torch.Generator().manual_seed(0)).item() < 1e-8

def test_cosine_schedule_and_ema():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs, seen = cosine_schedule(opt, steps=20, warmup=4), []
    for _ in range(20): seen.append(opt.param_groups[0]['lr']); opt.step(); lrs.step()
    assert seen[:4] == [0.25, 0.5, 0.75, 1.0] and seen[-1] < 0.01 and all(a >= b for a, b in zip(seen[3:], seen[4:]))
    ema = EMA(torch.nn.Linear(1, 1), max_decay=0.5)
    assert ema.decay(0) == 0.1 and ema.decay(100) == 0.5
    assert smooth([1.0, 3.0], beta=0.0) == [1.0, 3.0]

def test_caption_dropout_rate():
    import random
    dropped = drop_captions(["a red circle"] * 4000, random.Random(0), p_drop=0.1).count("")
    assert 300 < dropped < 500

def test_min_snr_weights_match_the_formula():
    scheduler, t = DDPMScheduler(), torch.tensor([0, 10, 100, 500, 999])
    ab = scheduler.alphas_cumprod[t]; snr = ab / (1 - ab)
    w = min_snr_weights(scheduler, t, 5.0)
    assert torch.isfinite(w).all() and torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[-1] == 1.0 and w[0] < 1e-3           # noisy steps keep weight 1, nearly clean ones almost none

def test_min_snr_loss_of_a_perfect_model_is_zero_and_gamma_changes_the_loss():
    scheduler, x0 = DDPMScheduler(), torch.randn(4, 3, 8, 8)
    assert ddpm_loss(Oracle(scheduler, x0), scheduler, x0, torch.Generator().manual_seed(0), snr_gamma=5.0).item() < 1e-8
    unet = tiny_unet()
    x = shapes_batch(8, seed=0, size=16).images * 2 - 1
    plain = ddpm_loss(unet, scheduler, x, torch.Generator().manual_seed(1))
    weighted = ddpm_loss(unet, scheduler, x, torch.Generator().manual_seed(1), snr_gamma=5.0)
    assert torch.isfinite(plain) and torch.isfinite(weighted) and weighted < plain   # weights are <= 1

def test_prediction_target_follows_the_schedulers_prediction_type():
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 900])
    v_scheduler = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(prediction_target(DDPMScheduler(), x0, eps, t), eps)
    assert torch.equal(prediction_target(DDPMScheduler(prediction_type="sample"), x0, eps, t), x0)
    assert torch.equal(prediction_target(v_scheduler, x0, eps, t), v_scheduler.get_velocity(x0, eps, t))
    other = type("Flow", (), {"config": {"prediction_type": "flow"}})()
    for f in (lambda: prediction_target(other, x0, eps, t), lambda: min_snr_weights(other, t, 5.0)):
        with pytest.raises(ValueError, match="prediction_type 'flow'"): f()

def test_min_snr_weights_the_x0_error_alike_for_every_target():
    t = torch.arange(1000)
    snr = DDPMScheduler().alphas_cumprod / (1 - DDPMScheduler().alphas_cumprod)
    for kind, in_x0 in [("epsilon", snr), ("v_prediction", snr + 1), ("sample", torch.ones_like(snr))]:
        w = min_snr_weights(DDPMScheduler(prediction_type=kind), t, 5.0)
        torch.testing.assert_close(w * in_x0, snr.clamp(max=5.0))            # the x0 error's weight: min(SNR, gamma)

def test_ddpm_loss_of_a_perfect_v_model_is_zero():
    scheduler, x0 = DDPMScheduler(prediction_type="v_prediction"), torch.randn(4, 3, 8, 8)
    eps_model = Oracle(scheduler, x0)
    class VOracle(torch.nn.Module):     # v from the perfect noise prediction
        def forward(self, x_t, t): return type("Out", (), {"sample": scheduler.get_velocity(x0, eps_model(x_t, t).sample, t)})
    assert ddpm_loss(VOracle(), scheduler, x0, torch.Generator().manual_seed(0), snr_gamma=5.0).item() < 1e-8
