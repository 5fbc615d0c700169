"""channels_last is opt-in (`model.to(memory_format=torch.channels_last)`): both UNets and the VAE give the
default-layout numbers within 1e-4, and nothing switches it on by itself."""
import sys
from pathlib import Path
import pytest, torch
sys.path.insert(0, str(Path(__file__).parent))
from test_compile import make

@pytest.mark.parametrize('name', ['unet_condition', 'unet_condition_sliced', 'unet2d', 'vae_decoder', 'vae_encoder'])
def test_channels_last_equals_default_layout(name):
    model, args = make(name)
    with torch.no_grad(): want = model(*args)
    model.to(memory_format=torch.channels_last)
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())
    x = args[0].to(memory_format=torch.channels_last)
    with torch.no_grad(): got = model(x, *args[1:])
    want, got = [y if isinstance(y, torch.Tensor) else y.sample for y in (want, got)]
    assert torch.isfinite(got).all() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

def test_default_layout_is_contiguous():
    model, args = make('unet_condition')
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad(): assert model(*args).sample.is_contiguous()
