"""The compiled path: `torch.compile(model, fullgraph=True)` traces both UNets, the VAE's encoder and decoder and the
CLIP text transformer with no graph break, and the compiled models (inductor, CPU) equal eager within 1e-4.

The default run traces with the `eager` backend (dynamo's graph capture, seconds per model); the inductor runs
compile C++ kernels and take minutes on a small shared CPU, so they are marked slow."""
import sys
from pathlib import Path
import pytest, torch
import torch._dynamo as dynamo
from minidiff import UNet2DConditionModel, UNet2DModel, AutoencoderKL, CLIPTextModel
sys.path.insert(0, str(Path(__file__).parent))
from test_slicing import UNET, UNET2D, VAE

TE = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

def make(name):
    "A small model and the inputs of one call, seeded."
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name.startswith('unet_condition'):
        m = UNet2DConditionModel.from_config(UNET).eval()
        if name.endswith('sliced'): m.set_attention_slice('auto')
        t = 500 if name.endswith('int_t') else torch.tensor([3, 700])
        return m, (torch.randn(2, 4, 8, 8, generator=g), t, torch.randn(2, 77, 32, generator=g))
    if name == 'unet2d': return UNet2DModel.from_config(UNET2D).eval(), (torch.randn(2, 3, 32, 32, generator=g), 10)
    if name == 'vae_decoder': return AutoencoderKL.from_config(VAE).eval().decoder, (torch.randn(2, 4, 8, 8, generator=g),)
    if name == 'vae_encoder': return AutoencoderKL.from_config(VAE).eval().encoder, (torch.randn(2, 3, 16, 16, generator=g),)
    if name == 'text_model': return CLIPTextModel(**TE).eval().text_model, (torch.randint(0, 1000, (2, 77), generator=g),)
    raise KeyError(name)

def out(y): return y if isinstance(y, torch.Tensor) else y.sample if hasattr(y, 'sample') else y[0]

def compiled_equals_eager(name, backend, tol):
    model, args = make(name)
    dynamo.reset()
    try:
        with torch.no_grad(): want, got = out(model(*args)), out(torch.compile(model, fullgraph=True, backend=backend)(*args))
    finally: dynamo.reset()
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, **tol)

NAMES = ['unet_condition', 'unet_condition_sliced', 'unet2d', 'vae_decoder', 'vae_encoder', 'text_model']

@pytest.mark.parametrize('name', NAMES)
def test_fullgraph_capture(name):
    "fullgraph=True raises on any graph break; the eager backend runs the captured graph as is."
    compiled_equals_eager(name, 'eager', dict(rtol=0, atol=0))

def test_int_timestep_is_captured_too():
    compiled_equals_eager('unet_condition_int_t', 'eager', dict(rtol=0, atol=0))

def test_clip_text_model_fullgraph():
    "The whole CLIPTextModel compiles: its input checks that read data back run in eager mode only."
    torch.manual_seed(0)
    te = CLIPTextModel(**TE).eval()
    ids = torch.randint(0, 1000, (2, 77))
    dynamo.reset()
    try:
        with torch.no_grad(): torch.compile(te, fullgraph=True, backend='eager')(ids)
    finally: dynamo.reset()

@pytest.mark.slow
@pytest.mark.parametrize('name', ['unet_condition', 'unet2d', 'vae_decoder', 'text_model'])
def test_inductor_equals_eager(name):
    "Inductor's fused C++ kernels sum in other orders: equal within 1e-4. (CPU compile: about 45-170 s each here.)"
    compiled_equals_eager(name, 'inductor', dict(rtol=0, atol=1e-4))
