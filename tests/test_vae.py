"AutoencoderKL: parity with diffusers (small and full SD v1.5 configs, the shipped micro VAE), both SD v1.5 weight spellings, errors, slicing, benchmark."
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file, save_file
from minidiff.core import CheckpointNotFoundError
from minidiff.loading import CheckpointError, fix_legacy_keys, check_state_dict, to_legacy_keys
from minidiff.vae import AutoencoderKL, DiagonalGaussianDistribution
from refconfigs import assert_close_finite

import diffusers
diffusers.utils.logging.disable_progress_bar(); diffusers.utils.logging.set_verbosity_error()
from diffusers import AutoencoderKL as RefVAE

CONFIGS = Path(__file__).parents[1]/'nbs'/'configs'
DATA = Path(__file__).parent/'data'
SD15 = json.loads((CONFIGS/'runwayml_stable-diffusion-v1-5'/'vae'/'config.json').read_text())
MSE = json.loads((CONFIGS/'stabilityai_sd-vae-ft-mse'/'config.json').read_text())
SMALL = {**SD15, 'block_out_channels': [32, 64], 'layers_per_block': 1, 'sample_size': 32,
         'down_block_types': ['DownEncoderBlock2D'] * 2, 'up_block_types': ['UpDecoderBlock2D'] * 2}
TOL = dict(rtol=1e-5, atol=1e-5)   # outputs of order 1
def write_sd_vae(folder, config, seed=0, legacy=True, fp16=True):
    "Seeded diffusers AutoencoderKL saved like SD v1.5's vae/: legacy-named fp32 file, new-named fp16 variant."
    torch.manual_seed(seed)
    ref = RefVAE.from_config(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1: p.add_(0.1 * torch.randn_like(p))   # norms away from 1/0, so mix-ups show
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(to_legacy_keys(sd) if legacy else sd, folder/'diffusion_pytorch_model.safetensors',
              metadata={'format': 'pt'})
    if fp16: save_file({k: v.half() for k, v in sd.items()}, folder/'diffusion_pytorch_model.fp16.safetensors',
                       metadata={'format': 'pt'})
    (folder/'config.json').write_text(json.dumps(config, indent=2))
    return ref


def images(b=2, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rel_err(a, b): return ((a - b).abs() / b.abs().clamp_min(1e-3)).max().item()


def compare(ours, ref, x, tol=TOL):
    "encode mean/std/logvar, seeded sample, kl, decode, forward (mode and sample), return_dict=False."
    errs = {}
    with torch.no_grad():
        po, pr = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        zo, zr = (p.sample(generator=torch.Generator().manual_seed(7)) for p in (po, pr))
        pairs = {'mean': (po.mean, pr.mean), 'std': (po.std, pr.std), 'logvar': (po.logvar, pr.logvar),
                 'sample': (zo, zr), 'kl': (po.kl(), pr.kl()), 'nll': (po.nll(zo), pr.nll(zr)), 'decode': (ours.decode(zo).sample, ref.decode(zr).sample),
                 'forward': (ours(x).sample, ref(x).sample),
                 'forward_sampled': (ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample,
                                     ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample),
                 'tuple': (ours.decode(zo, return_dict=False)[0], ref.decode(zr, return_dict=False)[0])}
    for name, (a, b) in pairs.items():
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
        errs[name] = rel_err(a, b)
    return errs


# ---------------------------------------------------------------- parity, small configs

VARIANTS = {
    'small': {},
    'three_levels_2_layers': {'block_out_channels': [32, 32, 64], 'layers_per_block': 2,
                              'down_block_types': ['DownEncoderBlock2D'] * 3, 'up_block_types': ['UpDecoderBlock2D'] * 3},
    'no_mid_attention': {'mid_block_add_attention': False},
    'no_quant_convs': {'use_quant_conv': False, 'use_post_quant_conv': False},
    'latent8_groups8_swish': {'latent_channels': 8, 'norm_num_groups': 8, 'act_fn': 'swish', 'in_channels': 1, 'out_channels': 2},
    'one_level': {'block_out_channels': [32], 'down_block_types': ['DownEncoderBlock2D'], 'up_block_types': ['UpDecoderBlock2D']},
}

@pytest.mark.parametrize('name', VARIANTS)
def test_parity_small_configs(tmp_path, name):
    config = {**SMALL, **VARIANTS[name]}
    write_sd_vae(tmp_path, config)
    ours, ref = AutoencoderKL.from_pretrained(tmp_path), RefVAE.from_pretrained(tmp_path).eval()
    x = images(2, 32)[:, :config['in_channels']]
    errs = compare(ours, ref, x)
    print(f"\n{name}: max relative errors {errs}")


def test_parity_generator_list_and_batch(tmp_path):
    "One generator per image, as pipelines pass them; a batch of 3 at a non-square size."
    ref = write_sd_vae(tmp_path, SMALL)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        po, pr = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        torch.testing.assert_close(po.sample(generator=gens()), pr.sample(generator=gens()), **TOL)
        torch.testing.assert_close(po.mode(), pr.mode(), **TOL)
        torch.testing.assert_close(po.kl(DiagonalGaussianDistribution(po.parameters.flip(0))),
                                   pr.kl(type(pr)(pr.parameters.flip(0))), **TOL)


def test_posterior_against_torch_distributions():
    "Moved from 14_vae: KL to itself is 0, the NLL is torch's log-density, samples spread by std."
    import math
    torch.manual_seed(0)
    moments = torch.cat([torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) - 1], dim=1)
    post = DiagonalGaussianDistribution(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    torch.testing.assert_close(post.kl(post), torch.zeros(2), rtol=0, atol=1e-5)
    nll = post.nll(post.mean)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll, -q.log_prob(post.mean).sum(dim=[1, 2, 3]), rtol=0, atol=1e-3)
    big = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 4, 64, 64), torch.full((1, 4, 64, 64), math.log(0.25))], 1))
    assert abs(big.sample(torch.Generator().manual_seed(0)).std().item() - 0.5) < 0.01


def test_deterministic_posterior():
    moments = torch.randn(2, 8, 4, 4)
    ours = DiagonalGaussianDistribution(moments, deterministic=True)
    ref = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(moments, deterministic=True)
    g = lambda: torch.Generator().manual_seed(0)
    torch.testing.assert_close(ours.sample(g()), ref.sample(g()))
    torch.testing.assert_close(ours.sample(g()), ours.mean)
    torch.testing.assert_close(ours.kl(), ref.kl())
    torch.testing.assert_close(ours.nll(moments[:, :4]), ref.nll(moments[:, :4]))


def test_mse_config_parity(tmp_path):
    "stabilityai/sd-vae-ft-mse's config, shrunk the same way."
    config = {**MSE, 'block_out_channels': [32, 64], 'layers_per_block': 1,
              'down_block_types': ['DownEncoderBlock2D'] * 2, 'up_block_types': ['UpDecoderBlock2D'] * 2}
    write_sd_vae(tmp_path, config, seed=1, legacy=False, fp16=False)
    compare(AutoencoderKL.from_pretrained(tmp_path), RefVAE.from_pretrained(tmp_path).eval(), images(1, 32))


def test_float16_variant_parity(tmp_path):
    write_sd_vae(tmp_path, SMALL)
    ours = AutoencoderKL.from_pretrained(tmp_path, variant='fp16', torch_dtype=torch.float16)
    ref = RefVAE.from_pretrained(tmp_path, variant='fp16', torch_dtype=torch.float16).eval()
    assert ours.dtype == torch.float16
    z = torch.randn(1, 4, 16, 16).half()
    with torch.no_grad(): a, b = ours.decode(z).sample, ref.decode(z).sample
    assert a.dtype == torch.float16
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_save_pretrained_round_trip(tmp_path):
    "Ours saved with save_pretrained loads in diffusers with the same outputs."
    write_sd_vae(tmp_path/'a', SMALL)
    ours = AutoencoderKL.from_pretrained(tmp_path/'a')
    ours.save_pretrained(tmp_path/'b')
    assert json.loads((tmp_path/'b'/'config.json').read_text())['scaling_factor'] == 0.18215
    compare(AutoencoderKL.from_pretrained(tmp_path/'b'), RefVAE.from_pretrained(tmp_path/'b').eval(), images(1, 32))


# ---------------------------------------------------------------- slicing

def test_slicing_matches_unsliced_and_diffusers(tmp_path):
    ref = write_sd_vae(tmp_path, SMALL)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    x, z = images(3, 32), torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        full_dec, full_mean = ours.decode(z).sample, ours.encode(x).latent_dist.mean
        ours.enable_slicing(); ref.enable_slicing()
        dec, mean = ours.decode(z).sample, ours.encode(x).latent_dist.mean
        torch.testing.assert_close(dec, ref.decode(z).sample, rtol=0, atol=0)      # same per-image computation
        torch.testing.assert_close(mean, ref.encode(x).latent_dist.mean, rtol=0, atol=0)
        torch.testing.assert_close(ours.decode(z[:1]).sample, dec[:1], rtol=0, atol=0)
        ours.disable_slicing()
        torch.testing.assert_close(ours.decode(z).sample, full_dec, rtol=0, atol=0)
    torch.testing.assert_close(dec, full_dec, **TOL)     # batched convs may sum in another order
    torch.testing.assert_close(mean, full_mean, **TOL)


# ---------------------------------------------------------------- loading

def real_keys(name):
    "key -> shape of a real SD v1.5 vae weight file (tests/data, from the Hub file headers)."
    rows = [l.split('\t') for l in (DATA/name).read_text().splitlines() if l.strip()]
    return {k: torch.Size(json.loads(s)) for k, s in rows}


@pytest.mark.parametrize('name', ['sd15_vae_fp32.keys.txt', 'sd15_vae_fp16.keys.txt'])
def test_real_key_layout_matches(name):
    "The real files' keys (legacy query/key/value/proj_attn in fp32, to_q/... in fp16) fit the model strictly."
    keys = real_keys(name)
    assert len(keys) == 248
    assert any('.query.' in k for k in keys) == (name == 'sd15_vae_fp32.keys.txt')
    with torch.device('meta'): model = AutoencoderKL.from_config(SD15)
    expected = dict(model.state_dict())
    sd = fix_legacy_keys({k: torch.empty(s, device='meta') for k, s in keys.items()}, expected)
    check_state_dict(sd, {k: v.shape for k, v in expected.items()})
    assert sum(v.numel() for v in expected.values()) == 83_653_863


def test_both_spellings_load(tmp_path):
    ref = write_sd_vae(tmp_path, SMALL)
    from minidiff.loading import read_safetensors_header
    assert 'decoder.mid_block.attentions.0.query.weight' in read_safetensors_header(tmp_path/'diffusion_pytorch_model.safetensors')
    assert 'decoder.mid_block.attentions.0.to_q.weight' in read_safetensors_header(tmp_path/'diffusion_pytorch_model.fp16.safetensors')
    a, b = AutoencoderKL.from_pretrained(tmp_path), AutoencoderKL.from_pretrained(tmp_path, variant='fp16')
    assert a.dtype == b.dtype == torch.float32 and not a.training
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(vb, va.half().float(), rtol=0, atol=0, msg=k)
    torch.testing.assert_close(a.decoder.mid_block.attentions[0].to_q.weight, ref.decoder.mid_block.attentions[0].to_q.weight)
    assert a.config.scaling_factor == 0.18215 and a.config.force_upcast is True


def test_loading_errors(tmp_path):
    write_sd_vae(tmp_path, SMALL, fp16=False)
    with pytest.raises(CheckpointNotFoundError, match='fp16'):
        AutoencoderKL.from_pretrained(tmp_path, variant='fp16')
    f = tmp_path/'diffusion_pytorch_model.safetensors'
    sd = load_file(f)
    save_file({k: v for k, v in sd.items() if 'decoder.mid_block.attentions.0.query' not in k}, f)
    with pytest.raises(CheckpointError, match=r'missing keys: decoder\.mid_block\.attentions\.0\.to_q\.bias'):
        AutoencoderKL.from_pretrained(tmp_path)
    save_file({**sd, 'encoder.extra.weight': torch.zeros(1)}, f)
    with pytest.raises(CheckpointError, match=r'unexpected keys: encoder\.extra\.weight'):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path/'config.json').write_text(json.dumps({**SMALL, 'latent_channels': 8}))
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r'shape mismatches.*quant_conv\.weight'):
        AutoencoderKL.from_pretrained(tmp_path)
    f.write_bytes(f.read_bytes()[:1000]); (tmp_path/'config.json').write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        AutoencoderKL.from_pretrained(tmp_path/'nowhere')


@pytest.mark.parametrize('kwargs,key', [
    (dict(down_block_types=['AttnDownEncoderBlock2D']), 'down_block_types'),
    (dict(up_block_types=['AttnUpDecoderBlock2D']), 'up_block_types'),
    (dict(act_fn='tanh'), 'act_fn'),
    (dict(block_out_channels=[32, 64]), 'same length'),
])
def test_unsupported_config(kwargs, key):
    with pytest.raises(ValueError, match=key) as e: AutoencoderKL(**kwargs)
    assert '\n' not in str(e.value)


# ---------------------------------------------------------------- bad input

def test_bad_input():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({**SMALL, 'block_out_channels': [32, 32, 32]} |
                                    {'down_block_types': ['DownEncoderBlock2D'] * 3, 'up_block_types': ['UpDecoderBlock2D'] * 3})
    with pytest.raises(ValueError, match=r'encode expects images \(B, 3, H, W\), got shape \(1, 4, 32, 32\)'):
        vae.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r'got shape \(3, 32, 32\)'): vae.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match='multiples of 4, got 30x32'): vae.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match='multiples of 4'): vae(torch.randn(1, 3, 32, 18))
    with pytest.raises(ValueError, match=r'decode expects latents \(B, 4, H, W\), got shape \(1, 8, 8, 8\)'):
        vae.decode(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match='decode expects latents'): vae.decode(torch.randn(4, 8, 8))
    vae.enable_slicing()
    with pytest.raises(ValueError): vae.decode(torch.randn(2, 3, 8, 8))
    assert vae.use_slicing is True
    with torch.no_grad(): assert vae.decode(torch.randn(2, 4, 5, 7)).sample.shape == (2, 3, 20, 28)   # any latent size decodes


# ---------------------------------------------------------------- full SD v1.5 config

@pytest.mark.slow
def test_parity_full_sd15_config(tmp_path):
    "The real SD v1.5 VAE config with seeded random weights: decode a 1x4x64x64 latent to 512x512; encode 256x256."
    ref = write_sd_vae(tmp_path, SD15, fp16=False)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.decode(z).sample, ref.decode(z).sample
        assert a.shape == (1, 3, 512, 512)
        x = images(1, 256)
        po, pr = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(po.mean, pr.mean, rtol=1e-5, atol=1e-5 * pr.mean.abs().max().item())
    torch.testing.assert_close(po.std, pr.std, rtol=1e-5, atol=1e-5 * pr.std.abs().max().item())
    print(f"\nfull SD v1.5 VAE config: decode max abs err {(a - b).abs().max().item():.2e} (max |out| {scale:.2f}), "
          f"max rel err {rel_err(a, b):.2e}; encode mean max rel err {rel_err(po.mean, pr.mean):.2e}, std {rel_err(po.std, pr.std):.2e}")


# ---------------------------------------------------------------- benchmark

BENCH = textwrap.dedent('''
    import sys, time, torch
    def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
    torch.set_num_threads(int(sys.argv[3]))
    which, folder = sys.argv[1], sys.argv[2]
    if which == 'ours':
        from minidiff.vae import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(folder)
    else:
        import diffusers; diffusers.utils.logging.set_verbosity_error()
        vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(z)
        open('/proc/self/clear_refs', 'w').write('5')      # reset the peak (VmHWM) to the current RSS
        rss = kb('VmRSS'); times = []
        for _ in range(int(sys.argv[4])):
            t = time.process_time(); vae.decode(z); times.append(time.process_time() - t)
    print(min(times), kb('VmHWM') - rss)
''')

@pytest.mark.benchmark
def test_benchmark_decode_vs_diffusers(tmp_path):
    "Real SD v1.5 VAE config, random weights, CPU: decode of a 1x4x64x64 latent to 512x512, CPU time and extra peak RSS."
    write_sd_vae(tmp_path, SD15, fp16=False)
    threads, reps = 1, 1          # one thread and CPU time: robust to other jobs on the machine
    res = {'ours': [], 'diffusers': []}
    for _ in range(2):                               # alternate, so that a busy machine hurts both alike
        for which in res:
            out = subprocess.run([sys.executable, '-c', BENCH, which, str(tmp_path), str(threads), str(reps)],
                                 capture_output=True, text=True, check=True)
            res[which].append([float(v) for v in out.stdout.split()])
    t_o, t_r = min(r[0] for r in res['ours']), min(r[0] for r in res['diffusers'])
    m_o, m_r = min(r[1] for r in res['ours']), min(r[1] for r in res['diffusers'])
    print(f"\nVAE decode 512x512, SD v1.5 config, CPU {threads} thread(s), CPU time: {t_o:.2f} s vs diffusers {t_r:.2f} s "
          f"(ratio {t_o / t_r:.2f}); extra peak RSS {m_o / 1024:.0f} MB vs {m_r / 1024:.0f} MB (ratio {m_o / m_r:.2f})")
    assert t_o / t_r < 1.05 and m_o / m_r < 1.02      # margins: run-to-run noise on a shared machine

def test_micro_vae_matches_diffusers():
    "The shipped micro VAE (trained weights): posterior, decode and tiled decode equal diffusers' on a disc picture."
    from minidiff.core import MICRO_SD
    ours, ref = AutoencoderKL.from_pretrained(MICRO_SD, subfolder='vae'), RefVAE.from_pretrained(MICRO_SD, subfolder='vae')
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing='ij')
    disc = ((xx - 0.4) ** 2 + (yy - 0.6) ** 2 < 0.25 ** 2).float()
    x = torch.stack([disc, 0.2 + 0.6 * disc, 1 - disc])[None] * 2 - 1                    # (1, 3, 128, 128)
    with torch.no_grad():
        a_post, b_post = ours.encode(x).latent_dist, ref.encode(x).latent_dist
        assert_close_finite(a_post.mean, b_post.mean, **TOL); assert_close_finite(a_post.std, b_post.std, **TOL)
        z = a_post.mode()
        assert_close_finite(ours.decode(z).sample, ref.decode(z).sample, **TOL)
        ours.enable_tiling(); ref.enable_tiling()
        assert_close_finite(ours.decode(z).sample, ref.decode(z).sample, **TOL)
