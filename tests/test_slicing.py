"""Attention slicing on both UNets and the VAE: the same numbers as diffusers' sliced models (float32, bfloat16,
float16), and the unsliced numbers up to rounding (see nbs/04_layers, 05_unet2d, 10_unet_condition, 14_vae)."""
import json
from pathlib import Path
import pytest, torch
import diffusers
from diffusers.models.attention_processor import Attention as RefAttn
from minidiff import UNet2DConditionModel, UNet2DModel, AutoencoderKL
from minidiff.layers import Attention, slice_attention

CONFIGS = Path(__file__).parents[1]/'nbs'/'configs'
SD15 = json.loads((CONFIGS/'runwayml_stable-diffusion-v1-5'/'unet'/'config.json').read_text())
SD15_VAE = json.loads((CONFIGS/'runwayml_stable-diffusion-v1-5'/'vae'/'config.json').read_text())
CAT = json.loads((CONFIGS/'google_ddpm-cat-256'/'config.json').read_text())
# two heads per layer (SD 2.x style per-level heads, upcast attention) so that 'auto' really slices
UNET = {**SD15, 'block_out_channels': [32, 64], 'layers_per_block': 1, 'cross_attention_dim': 32, 'sample_size': 16,
        'attention_head_dim': [2, 4], 'upcast_attention': True,
        'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
        'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}
UNET2D = {**CAT, 'block_out_channels': [32, 32, 32, 32, 32, 32], 'attention_head_dim': 16}   # two heads
VAE = {**SD15_VAE, 'block_out_channels': [32, 64], 'layers_per_block': 1, 'sample_size': 32,
       'down_block_types': SD15_VAE['down_block_types'][:2], 'up_block_types': SD15_VAE['up_block_types'][:2]}

def pair(ours_cls, ref_cls, cfg, seed=0):
    "diffusers' model with seeded weights (norms nudged off their init) and ours holding the same tensors."
    torch.manual_seed(seed)
    ref = ref_cls.from_config(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(torch.randn_like(p) * 0.05)
    ours = ours_cls.from_config(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref

def ref_slice(ref, size):
    "Slice a diffusers model: the model-level switch where it has one, else every `Attention` as `slice_attention` does."
    if hasattr(ref, 'set_attention_slice'): return ref.set_attention_slice(size)
    attns = [m for m in ref.modules() if isinstance(m, RefAttn)]
    for a in attns:
        a.set_attention_slice({None: None, 'auto': max(a.sliceable_head_dim // 2, 1), 'max': 1}.get(size, size))

@pytest.fixture(scope='module')
def models():
    return {'unet': pair(UNet2DConditionModel, diffusers.UNet2DConditionModel, UNET),
            'unet2d': pair(UNet2DModel, diffusers.UNet2DModel, UNET2D),
            'vae': pair(AutoencoderKL, diffusers.AutoencoderKL, VAE)}

def run(name, model, dtype):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if name == 'unet':
            x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
            return model(x.to(dtype), torch.tensor([3, 700]), ctx.to(dtype)).sample
        if name == 'unet2d': return model(torch.randn(2, 3, 32, 32, generator=g).to(dtype), torch.tensor([3, 700])).sample
        return model.decode(torch.randn(2, 4, 8, 8, generator=g).to(dtype)).sample

def slice_sizes(model): return [m.slice_size for m in model.modules() if isinstance(m, Attention)]

@pytest.mark.parametrize('name', ['unet', 'unet2d', 'vae'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('size', ['auto', 'max', 1])
def test_sliced_equals_diffusers_sliced(models, name, dtype, size):
    ours, ref = models[name]
    try:
        ours.to(dtype), ref.to(dtype)
        whole = run(name, ours, dtype)
        ours.set_attention_slice(size); ref_slice(ref, size)
        a, b = run(name, ours, dtype), run(name, ref, dtype)
        assert a.dtype == dtype and torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a, b), (a.float() - b.float()).abs().max().item()          # same arithmetic, same bits
        if dtype == torch.float32: torch.testing.assert_close(a, whole, rtol=0, atol=1e-4)
    finally:
        ours.set_attention_slice(None); ref_slice(ref, None); ours.float(), ref.float()

def test_unsliced_still_equals_diffusers(models):
    for name, (ours, ref) in models.items():
        a, b = run(name, ours, torch.float32), run(name, ref, torch.float32)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

def test_auto_on_one_head_layers_is_one():
    "diffusers' 'auto' is heads // 2 = 0 for a one-head layer (then a ZeroDivisionError); minidiff slices one map at a time."
    with torch.device('meta'): vae, cat = AutoencoderKL.from_config(SD15_VAE), UNet2DModel.from_config(CAT)
    for m in (vae, cat):
        m.set_attention_slice('auto')
        assert set(slice_sizes(m)) == {1}
    with torch.device('meta'): unet = UNet2DConditionModel.from_config(SD15)
    unet.set_attention_slice('auto')
    assert set(slice_sizes(unet)) == {4}

def test_slice_attention_errors():
    with torch.device('meta'): vae = AutoencoderKL.from_config(VAE)
    with pytest.raises(ValueError, match='between 1 and the number of heads 1'): vae.set_attention_slice(2)
    with pytest.raises(ValueError, match='entries but the model has 2'): slice_attention(vae, [1, 1, 1])
    assert set(slice_sizes(vae)) == {None}
