"""VAE tiling (nbs/14_vae): tiled encode/decode equal diffusers' tiled AutoencoderKL on a small VAE with small tiles,
ragged edges, slicing on top, half precision; inputs no larger than a tile are not tiled."""
import json
from pathlib import Path
import pytest, torch
import diffusers
from minidiff import AutoencoderKL
from minidiff.vae import blend

SD15_VAE = json.loads((Path(__file__).parents[1]/'nbs'/'configs'/'runwayml_stable-diffusion-v1-5'/'vae'/'config.json')
                      .read_text())
# three levels (factor 4), 32-pixel / 8-latent tiles: a stride of 24 pixels / 6 latents, 8-pixel / 2-latent blends
SMALL = {**SD15_VAE, 'block_out_channels': [32, 32, 64], 'layers_per_block': 1, 'sample_size': 32,
         'down_block_types': SD15_VAE['down_block_types'][:3], 'up_block_types': SD15_VAE['up_block_types'][:3]}
TOL = dict(rtol=0, atol=1e-4)

@pytest.fixture(scope='module')
def vaes():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(SMALL).eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(torch.randn_like(p) * 0.05)
    ours = AutoencoderKL.from_config(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref

def both(vaes, fn, tiling=True, slicing=False):
    out = []
    for m in vaes:
        if tiling: m.enable_tiling()
        if slicing: m.enable_slicing()
        try:
            with torch.no_grad(): out.append(fn(m))
        finally: m.disable_tiling(); m.disable_slicing()
    assert all(torch.isfinite(o).all() for o in out)
    return out

def test_tile_sizes_follow_diffusers(vaes):
    ours, ref = vaes
    for name in ('tile_sample_min_size', 'tile_latent_min_size', 'tile_overlap_factor', 'use_tiling'):
        assert getattr(ours, name) == getattr(ref, name), name
    with torch.device('meta'): sd = AutoencoderKL.from_config(SD15_VAE)
    assert (sd.tile_sample_min_size, sd.tile_latent_min_size, sd.tile_overlap_factor) == (512, 64, 0.25)

@pytest.mark.parametrize('hw', [(20, 20), (17, 9), (8, 30), (14, 14)])
def test_tiled_decode_equals_diffusers(vaes, hw):
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(sum(hw)))
    a, b = both(vaes, lambda m: m.decode(z).sample)
    torch.testing.assert_close(a, b, **TOL)

@pytest.mark.parametrize('hw', [(80, 80), (72, 40), (32, 96)])
def test_tiled_encode_equals_diffusers(vaes, hw):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(sum(hw))) * 2 - 1
    a, b = both(vaes, lambda m: m.encode(x).latent_dist.parameters)
    torch.testing.assert_close(a, b, **TOL)
    g = lambda: torch.Generator().manual_seed(0)
    a, b = both(vaes, lambda m: m(x, sample_posterior=True, generator=g()).sample)      # encode + decode, both tiled
    torch.testing.assert_close(a, b, **TOL)

def test_tiling_and_slicing_together(vaes):
    z = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(5))
    a, b = both(vaes, lambda m: m.decode(z).sample, slicing=True)
    torch.testing.assert_close(a, b, **TOL)
    whole, = both(vaes[:1], lambda m: m.decode(z).sample)
    torch.testing.assert_close(a, whole, rtol=0, atol=1e-5)                              # slicing changes nothing

def test_tiled_decode_public_and_bfloat16(vaes):
    ours, ref = vaes
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(): torch.testing.assert_close(ours.tiled_decode(z).sample, ref.tiled_decode(z).sample, **TOL)
    try:
        ours.bfloat16(), ref.bfloat16()
        a, b = both(vaes, lambda m: m.decode(z.bfloat16()).sample)
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)             # same operations in the same order: same bits
    finally: ours.float(), ref.float()

def test_no_larger_than_a_tile_is_not_tiled(vaes):
    ours, _ = vaes
    z, x = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32, 32)
    with torch.no_grad(): plain, plain_enc = ours.decode(z).sample, ours.encode(x).latent_dist.mean
    tiled = both((ours,), lambda m: m.decode(z).sample)[0]
    tiled_enc = both((ours,), lambda m: m.encode(x).latent_dist.mean)[0]
    assert torch.equal(plain, tiled) and torch.equal(plain_enc, tiled_enc)

def test_tiled_differs_from_whole_only_near_the_seams(vaes):
    "Tiling is an approximation: each tile has its own GroupNorm statistics; the output keeps the untiled shape."
    ours, _ = vaes
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(): whole = ours.decode(z).sample
    tiled, = both((ours,), lambda m: m.decode(z).sample)
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)

def test_blend_cross_fades_in_place():
    a, b = torch.zeros(1, 1, 3, 5), torch.ones(1, 1, 3, 5)
    out = blend(a, b, 4, dim=3)
    assert out is b
    torch.testing.assert_close(b[0, 0, 0], torch.tensor([0, 0.25, 0.5, 0.75, 1]))
    c = torch.ones(1, 1, 2, 2)
    blend(torch.zeros(1, 1, 2, 2), c, 8, dim=2)                      # extent capped at the tile's size
    torch.testing.assert_close(c[0, 0, :, 0], torch.tensor([0, 0.5]))
