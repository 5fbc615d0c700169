"Under the same seed, our models hold diffusers' initial weights tensor by tensor: same layers, created in the same order."
import json
from pathlib import Path
import pytest, torch
import diffusers
from minidiff.unet2d import UNet2DModel
from minidiff.unet_condition import UNet2DConditionModel
from minidiff.vae import AutoencoderKL

CONFIGS = Path(__file__).resolve().parents[1]/'nbs'/'configs'
def real(path): return {k: v for k, v in json.loads((CONFIGS/path).read_text()).items() if not k.startswith('_')}

DDPM = {**real('google_ddpm-cat-256/config.json'), 'block_out_channels': [32, 32, 64, 64, 64, 64]}
SD_UNET = {**real('runwayml_stable-diffusion-v1-5/unet/config.json'), 'block_out_channels': [32, 64, 64, 64],
           'cross_attention_dim': 32}
SD_VAE = {**real('runwayml_stable-diffusion-v1-5/vae/config.json'), 'block_out_channels': [32, 32, 64, 64]}
CASES = {
    'UNet2DModel ddpm-cat-256': (UNet2DModel, diffusers.UNet2DModel, DDPM),
    'UNet2DModel scale_shift, no mid attention': (UNet2DModel, diffusers.UNet2DModel,
        {**DDPM, 'resnet_time_scale_shift': 'scale_shift', 'add_attention': False, 'attention_head_dim': 16}),
    'UNet2DConditionModel SD v1.5': (UNet2DConditionModel, diffusers.UNet2DConditionModel, SD_UNET),
    'UNet2DConditionModel SD 2.x-style': (UNet2DConditionModel, diffusers.UNet2DConditionModel,
        {**SD_UNET, 'attention_head_dim': [2, 4, 8, 8], 'use_linear_projection': True, 'layers_per_block': [1, 2, 1, 2],
         'transformer_layers_per_block': [1, 2, 1, 1]}),
    'AutoencoderKL SD v1.5': (AutoencoderKL, diffusers.AutoencoderKL, SD_VAE),
}

@pytest.mark.parametrize('name', list(CASES))
def test_seeded_init_equals_diffusers(name):
    ours_cls, ref_cls, config = CASES[name]
    torch.manual_seed(0); ours = ours_cls(**config)
    torch.manual_seed(0); ref = ref_cls(**config)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)                     # same keys, registered in the same order
    for k, v in sd.items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, ref_sd[k]), k


def test_clip_text_model_keys_in_transformers_order():
    """CLIPTextModel creates and registers its layers in transformers' order; its initial *values* differ, because
    transformers re-draws every weight after construction (`CLIPPreTrainedModel._init_weights` in `post_init`)."""
    import transformers
    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    from minidiff.text_encoder import CLIPTextModel
    ours = CLIPTextModel(**cfg).state_dict()
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).state_dict()
    ref = [k if k.startswith('text_model.') else f'text_model.{k}' for k in ref if not k.endswith('position_ids')]
    assert list(ours) == ref
