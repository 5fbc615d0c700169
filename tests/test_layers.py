"Layers (04_layers): extra parity cases against diffusers (non-square maps, odd sizes, fp16/bf16 casts) and errors."
import pytest, torch
import torch.nn.functional as F
from minidiff.layers import (get_timestep_embedding, get_activation, TimestepEmbedding, ResnetBlock2D, Attention,
                             Downsample2D, Upsample2D)

import diffusers
from diffusers.models.embeddings import get_timestep_embedding as ref_emb
from diffusers.models.resnet import ResnetBlock2D as RefRes
from diffusers.models.attention_processor import Attention as RefAttn
from diffusers.models.downsampling import Downsample2D as RefDown
from diffusers.models.upsampling import Upsample2D as RefUp

def check(ours, ref, *args, rtol=1e-5, atol=1e-5, **kwargs):
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad(): a, b = ours.eval()(*args, **kwargs), ref.eval()(*args, **kwargs)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)

@pytest.mark.parametrize("dim,flip,shift,scale,max_period", [(1, False, 1, 1, 10000), (9, True, 0, 1, 10000),
                                                             (256, True, 1, 1000, 10000), (64, False, 0, 1, 100)])
def test_timestep_embedding_bit_exact(dim, flip, shift, scale, max_period):
    t = torch.tensor([0, 1, 17.25, 999])
    got = get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    assert torch.equal(got, ref_emb(t, dim, flip, shift, scale, max_period))

def test_non_square_maps_and_odd_sizes():
    torch.manual_seed(0)
    x, temb = torch.randn(3, 32, 7, 12), torch.randn(3, 64)
    check(ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=64, dropout=0.3),
          RefRes(in_channels=32, out_channels=64, temb_channels=64, dropout=0.3), x, temb)
    legacy = dict(heads=2, dim_head=16, bias=True, norm_num_groups=8, eps=1e-6, residual_connection=True)
    check(Attention(32, **legacy), RefAttn(32, **legacy), x)
    for pad in (0, 1):
        check(Downsample2D(32, use_conv=True, padding=pad), RefDown(32, use_conv=True, padding=pad, name="op"), x)
    check(Upsample2D(32, use_conv=True, out_channels=16), RefUp(32, use_conv=True, out_channels=16), x, output_size=(14, 23))

def test_cross_attention_with_slices_that_do_not_divide():
    torch.manual_seed(0)
    kw = dict(cross_attention_dim=24, heads=5, dim_head=8, dropout=0.1)
    ours, ref = Attention(40, **kw), RefAttn(40, **kw)
    tokens, text = torch.randn(3, 10, 40), torch.randn(3, 7, 24)
    check(ours, ref, tokens, encoder_hidden_states=text)
    for s in (1, 2, 4, 5):
        ours.set_attention_slice(s); ref.set_attention_slice(s)
        check(ours, ref, tokens, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="slice_size 0"): ours.set_attention_slice(0)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_diffusers(dtype):
    torch.manual_seed(0)
    legacy = dict(heads=1, dim_head=64, bias=True, norm_num_groups=32, eps=1e-6, residual_connection=True, upcast_softmax=True)
    ours, ref = Attention(64, **legacy), RefAttn(64, **legacy)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad(): full = ref(x)
    ours, ref = ours.to(dtype), ref.to(dtype)
    with torch.no_grad(): a, b = ours(x.to(dtype)), ref(x.to(dtype))
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.float(), full, rtol=0, atol=0.1)

def test_meta_device_builds_without_storage():
    with torch.device("meta"):
        blocks = [ResnetBlock2D(in_channels=32, out_channels=64), Attention(64, norm_num_groups=32), TimestepEmbedding(32, 128),
                  Downsample2D(64, use_conv=True), Upsample2D(64, use_conv=True)]
    assert all(t.is_meta for b in blocks for t in b.state_dict().values())

def test_errors():
    with pytest.raises(ValueError, match="timesteps must be 1-d"): get_timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="unsupported time_embedding_norm 'spatial'"):
        ResnetBlock2D(in_channels=32, time_embedding_norm="spatial")
    with pytest.raises(ValueError, match="unsupported act_fn"): ResnetBlock2D(in_channels=32, non_linearity="tanh")
    with pytest.raises(ValueError, match="out_channels must equal channels"): Downsample2D(8, out_channels=16)

def test_errors_moved_from_the_notebook():
    "The error checks 04_layers used to hold: a ResNet block with a time projection needs temb; slice sizes; activations."
    res = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=128)
    with pytest.raises(ValueError, match="pass temb"): res(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match="'ada_group'"): ResnetBlock2D(in_channels=32, time_embedding_norm="ada_group")
    with pytest.raises(ValueError, match="slice_size 8"): Attention(64, heads=4, dim_head=16).set_attention_slice(8)
    with pytest.raises(ValueError, match="unsupported hidden_act 'tanh'"): get_activation('tanh', key='hidden_act')

def test_shapes_and_keys_moved_from_the_notebook():
    vae_res = ResnetBlock2D(in_channels=32, temb_channels=None)
    assert vae_res.time_emb_proj is None and vae_res.conv_shortcut is None
    tokens = torch.randn(2, 77, 64)
    assert Attention(64, heads=4, dim_head=16)(tokens).shape == (2, 77, 64)
    assert Attention(64, cross_attention_dim=48, heads=4, dim_head=16).to_k.weight.shape == (64, 48)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(Downsample2D(4)(x), F.avg_pool2d(x, 2))
    assert list(Downsample2D(4, use_conv=True, padding=0).state_dict()) == ['conv.weight', 'conv.bias']

@pytest.mark.parametrize("name", ["silu", "swish", "mish", "gelu", "relu", "quick_gelu"])
def test_activations_match_diffusers_and_transformers(name):
    "Every name of the one table gives the function diffusers' get_activation / transformers' ACT2FN give."
    from transformers.activations import ACT2FN
    x = torch.linspace(-6, 6, 101)
    ours = get_activation(name)(x)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, ACT2FN[name](x))
    if name != "quick_gelu":
        from diffusers.models.activations import get_activation as diffusers_activation
        assert torch.equal(ours, diffusers_activation(name)(x))
