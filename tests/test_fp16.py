"""No black images (nbs/14_vae, 04_layers): a float16/bfloat16 VAE decode that overflows is redone in float32 when
`force_upcast` allows it; a finite one is left as diffusers computes it; `check_finite` names a non-finite step."""
import json, warnings
from pathlib import Path
import pytest, torch
import diffusers
from minidiff import AutoencoderKL
from minidiff.layers import check_finite

SD15_VAE = json.loads((Path(__file__).parents[1]/'nbs'/'configs'/'runwayml_stable-diffusion-v1-5'/'vae'/'config.json')
                      .read_text())
SMALL = {**SD15_VAE, 'block_out_channels': [32, 64], 'layers_per_block': 1, 'sample_size': 32,
         'down_block_types': SD15_VAE['down_block_types'][:2], 'up_block_types': SD15_VAE['up_block_types'][:2]}
HOT = 1e5   # decoder.conv_in's outputs then pass float16's 65504; its weights (about 1e4) still fit

def hot_pair(config=SMALL):
    "diffusers' VAE and ours, same weights, with the decoder's first convolution scaled so float16 overflows."
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(config).eval()
    with torch.no_grad(): ref.decoder.conv_in.weight.mul_(HOT)
    ours = AutoencoderKL.from_config(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref

def decode(vae, z, **kw):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = vae.decode(z, **kw).sample
    return out, [w for w in caught if 'overflowed' in str(w.message)]

Z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

def test_float16_overflow_is_redone_in_float32():
    ours, ref = hot_pair()
    want, _ = decode(ours, Z)                                          # float32: finite
    assert torch.isfinite(want).all()
    ours.half(), ref.half()
    with torch.no_grad(): black = ref.decode(Z.half()).sample          # diffusers' SD v1.x path: NaN
    assert not torch.isfinite(black).all()
    raw, warned = decode(ours, Z.half(), upcast=False)
    assert not torch.isfinite(raw).all() and not warned
    fixed, warned = decode(ours, Z.half())
    assert fixed.dtype == torch.float16 and torch.isfinite(fixed).all() and len(warned) == 1
    assert all(p.dtype == torch.float16 for p in ours.parameters())  # the model is back in float16
    torch.testing.assert_close(fixed.float(), want, rtol=0, atol=5e-3)  # float16 resolution (weights rounded too)

def test_force_upcast_false_keeps_the_half_result():
    ours, _ = hot_pair({**SMALL, 'force_upcast': False})
    ours.half()
    raw, warned = decode(ours, Z.half())
    assert not torch.isfinite(raw).all() and not warned
    fixed, warned = decode(ours, Z.half(), upcast=True)                # per-call override
    assert torch.isfinite(fixed).all() and len(warned) == 1

def test_bfloat16_nan_is_redone_too():
    "bfloat16 has float32's range, so force a NaN only the half-precision decode sees."
    ours, _ = hot_pair()
    want, _ = decode(ours, Z)
    ours.bfloat16()
    hook = ours.decoder.mid_block.register_forward_hook(
        lambda m, args, out: out * float('nan') if out.dtype == torch.bfloat16 else out)
    try: fixed, warned = decode(ours, Z.bfloat16())
    finally: hook.remove()
    assert fixed.dtype == torch.bfloat16 and torch.isfinite(fixed).all() and len(warned) == 1
    torch.testing.assert_close(fixed.float(), want, rtol=0, atol=3e-2)  # bfloat16 resolution

def test_guard_with_slicing_and_tiling():
    ours, _ = hot_pair()
    z = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    ours.enable_slicing(), ours.enable_tiling()
    want, _ = decode(ours, z)
    ours.half()
    fixed, warned = decode(ours, z.half())
    assert torch.isfinite(fixed).all() and len(warned) == 1 and ours.use_tiling and ours.use_slicing
    torch.testing.assert_close(fixed.float(), want, rtol=0, atol=5e-3)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_finite_half_decode_is_untouched_and_equals_diffusers(dtype):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(SMALL).eval()
    ours = AutoencoderKL.from_config(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.to(dtype), ref.to(dtype)
    a, warned = decode(ours, Z.to(dtype))
    with torch.no_grad(): b = ref.decode(Z.to(dtype)).sample
    assert not warned and a.dtype == dtype and torch.isfinite(a).all() and torch.equal(a, b)

def test_float32_decode_is_never_redone():
    ours, _ = hot_pair()
    with torch.no_grad(): ours.decoder.conv_in.weight.fill_(float('inf'))
    out, warned = decode(ours, Z)
    assert not warned and not torch.isfinite(out).all()

def test_check_finite():
    x = torch.randn(2, 4, 8, 8).half()
    assert check_finite(x) is x
    with pytest.raises(FloatingPointError, match=r'latents became NaN/inf at step 7 in torch.float16'):
        check_finite(torch.full((2,), 70000.).half(), step=7)
    with pytest.raises(FloatingPointError, match=r'^noise_pred became NaN/inf in torch.bfloat16'):
        check_finite(torch.tensor([float('nan')]).bfloat16(), what='noise_pred')
