"""LoRA loading: parity with diffusers + peft in the kohya and diffusers formats, fuse/unfuse, unload, and clear errors;
training an adapter and saving it in diffusers' format."""
import json, os
import numpy as np
import pytest, torch
from torch import nn
from safetensors.torch import save_file
from minidiff import StableDiffusionPipeline, CheckpointError, DDPMScheduler, save_tiny_sd
from minidiff.lora import lora_layers, parse_lora_key, add_lora, lora_state_dict, UNET_TARGETS, TEXT_ENCODER_TARGETS
from minidiff.training import ddpm_loss, fit

os.environ.setdefault('HF_HUB_OFFLINE', '1')
pytest.importorskip('peft')
from diffusers import StableDiffusionPipeline as DPipe
from diffusers.utils import scale_lora_layers, unscale_lora_layers

RANK = 4

@pytest.fixture(scope='module')
def folder(tmp_path_factory): return save_tiny_sd(tmp_path_factory.mktemp('tiny')/'sd')

def new_pipes(folder):
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ref = DPipe.from_pretrained(folder, safety_checker=None, feature_extractor=None)
    return ours, ref

def targets(model):
    "Every layer the random LoRAs adapt: attention, feed-forward, 1x1 proj_in/out, ResNet 3x3 convs and time projections."
    keep = ('to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out', 'ff.net.0.proj', 'ff.net.2', 'conv1', 'conv2',
            'time_emb_proj', 'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2')
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(keep)}

def random_pair(m, g):
    if isinstance(m, nn.Conv2d):
        return (torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) * 0.3, torch.randn(m.out_channels, RANK, 1, 1, generator=g) * 0.3)
    return torch.randn(RANK, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, RANK, generator=g) * 0.3

def kohya_file(pipe, path, seed=0, alphas=(2.0,)):
    g, sd = torch.Generator().manual_seed(seed), {}
    for part, pre in (('unet', 'lora_unet_'), ('text_encoder', 'lora_te_')):
        for i, (n, m) in enumerate(targets(getattr(pipe, part)).items()):
            k = pre + n.replace('.', '_')
            sd[f'{k}.lora_down.weight'], sd[f'{k}.lora_up.weight'] = random_pair(m, g)
            sd[f'{k}.alpha'] = torch.tensor(alphas[i % len(alphas)])
    save_file(sd, str(path)); return path

def peft_file(pipe, path, seed=1, alpha=None):
    g, sd, names = torch.Generator().manual_seed(seed), {}, {}
    for part in ('unet', 'text_encoder'):
        for n, m in targets(getattr(pipe, part)).items():
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1): continue   # keep the peft file to Linear + 1x1
            sd[f'{part}.{n}.lora_A.weight'], sd[f'{part}.{n}.lora_B.weight'] = random_pair(m, g)
            names.setdefault(part, []).append(n.removeprefix('text_model.'))   # peft matches name suffixes
    meta = {'format': 'pt'}
    if alpha is not None:   # the LoraConfig that diffusers' save_lora_weights stores, prefixed by the part
        meta['lora_adapter_metadata'] = json.dumps({f'{p}.{k}': v for p in names for k, v in
                                                    dict(r=RANK, lora_alpha=alpha, target_modules=names[p]).items()})
    save_file(sd, str(path), metadata=meta); return path

def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g), torch.randint(0, 49408, (2, 77), generator=g)

@torch.no_grad()
def outputs(pipe, ref_scale=None, ours_scale=None):
    x, t, emb, ids = inputs()
    if isinstance(pipe, DPipe):
        kw = {} if ref_scale is None else {'cross_attention_kwargs': {'scale': ref_scale}}
        if ref_scale is not None: scale_lora_layers(pipe.text_encoder, ref_scale)
        te = pipe.text_encoder(ids)[0]
        if ref_scale is not None: unscale_lora_layers(pipe.text_encoder, ref_scale)
        return pipe.unet(x, t, emb, **kw).sample, te
    with pipe.lora_scale(ours_scale):
        return pipe.unet(x, t, emb).sample, pipe.text_encoder(ids)[0]

def assert_close(a, b, atol=1e-4):
    for u, v in zip(a, b):
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        torch.testing.assert_close(u, v, rtol=0, atol=atol)

def max_err(a, b): return max((u - v).abs().max().item() for u, v in zip(a, b))

@pytest.mark.parametrize('fmt', ['kohya', 'peft', 'peft_alpha'])
def test_parity_with_diffusers(folder, tmp_path, fmt):
    ours, ref = new_pipes(folder)
    base = outputs(ours)
    f = {'kohya': kohya_file, 'peft': peft_file, 'peft_alpha': lambda p, f: peft_file(p, f, alpha=8)}[fmt](ours, tmp_path/'l.safetensors')
    ours.load_lora_weights(f); ref.load_lora_weights(str(f))
    a, b = outputs(ours), outputs(ref)
    assert max_err(a, base) > 1e-2                                   # the LoRA does change the outputs
    assert_close(a, b)
    assert_close(outputs(ours, ours_scale=0.5), outputs(ref, ref_scale=0.5))
    print(fmt, 'scale 1', max_err(a, b), 'scale 0.5', max_err(outputs(ours, ours_scale=0.5), outputs(ref, ref_scale=0.5)))

def test_fuse_parity_and_unfuse_bit_exact(folder, tmp_path):
    ours, ref = new_pipes(folder)
    before = {k: v.clone() for p in ('unet', 'text_encoder') for k, v in getattr(ours, p).state_dict().items()}
    f = kohya_file(ours, tmp_path/'l.safetensors')
    ours.load_lora_weights(f); ref.load_lora_weights(str(f))
    unfused = outputs(ours)
    ours.fuse_lora(lora_scale=0.7); ref.fuse_lora(lora_scale=0.7)
    a, b = outputs(ours), outputs(ref)
    assert_close(a, b)
    print('fused', max_err(a, b))
    ours.unfuse_lora()
    after = {k: v for p in ('unet', 'text_encoder') for k, v in getattr(ours, p).state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(u, v) for u, v in zip(outputs(ours), unfused))   # the adapters work through their hooks again

def test_images_match_diffusers(folder, tmp_path):
    ours, ref = new_pipes(folder)
    f = kohya_file(ours, tmp_path/'l.safetensors')
    ours.load_lora_weights(f); ref.load_lora_weights(str(f))
    kw = dict(num_inference_steps=2, output_type='np', height=32, width=32)
    a = ours('a red cat', generator=torch.Generator().manual_seed(0), **kw).images
    b = ref('a red cat', generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 1e-4, abs(a - b).max()

def test_unload_restores_outputs_and_keeps_fused(folder, tmp_path):
    ours, _ = new_pipes(folder)
    base = outputs(ours)
    f = kohya_file(ours, tmp_path/'l.safetensors')
    ours.load_lora_weights(f); with_lora = outputs(ours)
    ours.unload_lora_weights()
    assert lora_layers(ours) == [] and all(torch.equal(u, v) for u, v in zip(outputs(ours), base))
    ours.load_lora_weights(f); ours.fuse_lora(); ours.unload_lora_weights()
    assert lora_layers(ours) == []
    assert_close(outputs(ours), with_lora)                           # fuse then unload bakes the LoRA in

def test_two_adapters_and_names(folder, tmp_path):
    ours, _ = new_pipes(folder)
    f1, f2 = kohya_file(ours, tmp_path/'a.safetensors', 0), kohya_file(ours, tmp_path/'b.safetensors', 5)
    assert ours.load_lora_weights(f1) == 'default_0'
    assert ours.load_lora_weights(f2, adapter_name='style') == 'style'
    assert ours.get_active_adapters() == ['default_0', 'style']
    with pytest.raises(ValueError, match='already in use'): ours.load_lora_weights(f1, adapter_name='style')

def test_folder_and_weight_name(folder, tmp_path):
    ours, _ = new_pipes(folder)
    (tmp_path/'d').mkdir(); kohya_file(ours, tmp_path/'d'/'pytorch_lora_weights.safetensors')
    kohya_file(ours, tmp_path/'d'/'other.safetensors')
    ours.load_lora_weights(tmp_path/'d'); ours.load_lora_weights(tmp_path/'d', weight_name='other.safetensors')
    assert len(ours.get_active_adapters()) == 2

def snapshot(pipe): return {f'{p}.{k}': v.clone() for p in ('unet', 'text_encoder') for k, v in getattr(pipe, p).state_dict().items()}

def assert_unchanged(pipe, snap):
    assert lora_layers(pipe) == [] and pipe.get_active_adapters() == []
    now = snapshot(pipe)
    assert all(torch.equal(snap[k], now[k]) for k in snap)

@pytest.mark.parametrize('case,msg', [
    ('sdxl', 'match no layer'), ('wrong_shape', 'do not fit'), ('missing_up', 'needs down and up'), ('not_lora', 'match no layer')])
def test_bad_lora_is_refused_and_pipeline_unchanged(folder, tmp_path, case, msg):
    ours, _ = new_pipes(folder)
    snap = snapshot(ours)
    good = kohya_file(ours, tmp_path/'good.safetensors')
    from safetensors.torch import load_file
    sd = load_file(str(good))
    k = 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    bad = {'sdxl': {**sd, 'lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight': torch.zeros(4, 640),
                    'lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight': torch.zeros(640, 4)},
           'wrong_shape': {**sd, f'{k}.lora_down.weight': torch.zeros(4, 31)},
           'missing_up': {x: v for x, v in sd.items() if x != f'{k}.lora_up.weight'},
           'not_lora': {**sd, 'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(1)}}[case]
    save_file(bad, str(tmp_path/'bad.safetensors'))
    with pytest.raises(CheckpointError, match=msg): ours.load_lora_weights(tmp_path/'bad.safetensors')
    assert_unchanged(ours, snap)

def test_truncated_and_missing_files(folder, tmp_path):
    ours, _ = new_pipes(folder)
    snap = snapshot(ours)
    good = kohya_file(ours, tmp_path/'good.safetensors')
    data = good.read_bytes(); (tmp_path/'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.safetensors'): ours.load_lora_weights(tmp_path/'cut.safetensors')
    with pytest.raises(FileNotFoundError, match='nothing.safetensors'): ours.load_lora_weights(tmp_path/'nothing.safetensors')
    assert_unchanged(ours, snap)

def test_parse_old_diffusers_formats():
    assert parse_lora_key('unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight') == \
        ('unet', 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'down')
    assert parse_lora_key('text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight') == \
        ('text_encoder', 'text_model.encoder.layers.1.mlp.fc1', 'up')
    assert parse_lora_key('down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight') == \
        ('unet', 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k', 'down')
    assert parse_lora_key('lora_te_text_model_encoder_layers_0_mlp_fc2.alpha') == ('text_encoder', 'text_model_encoder_layers_0_mlp_fc2', 'alpha')
    assert parse_lora_key('first_stage_model.decoder.conv_in.weight') is None

def test_old_diffusers_format_matches_peft_format(folder, tmp_path):
    ours, _ = new_pipes(folder)
    f = peft_file(ours, tmp_path/'p.safetensors')
    from safetensors.torch import load_file
    sd = load_file(str(f))
    old = {k.replace('.lora_A.', '.lora.down.').replace('.lora_B.', '.lora.up.'): v for k, v in sd.items()}
    ours.load_lora_weights(f); a = outputs(ours); ours.unload_lora_weights()
    ours.load_lora_weights(old); b = outputs(ours)
    assert all(torch.equal(u, v) for u, v in zip(a, b))

def test_per_module_alpha_fuses_to_the_formula(folder, tmp_path):
    "kohya files may give each module its own alpha (diffusers 0.42 mis-keys such alpha patterns: checked by hand)."
    ours, _ = new_pipes(folder)
    before = snapshot(ours)
    f = kohya_file(ours, tmp_path/'l.safetensors', alphas=(2.0, 4.0, 8.0))
    from safetensors.torch import load_file
    sd = load_file(str(f))
    ours.load_lora_weights(f); ours.fuse_lora(lora_scale=0.5)
    for part, pre in (('unet', 'lora_unet_'), ('text_encoder', 'lora_te_')):
        for n, m in targets(getattr(ours, part)).items():
            k = pre + n.replace('.', '_')
            down, up, alpha = sd[f'{k}.lora_down.weight'], sd[f'{k}.lora_up.weight'], sd[f'{k}.alpha'].item()
            want = before[f'{part}.{n}.weight'] + 0.5 * alpha / RANK * (up.flatten(1) @ down.flatten(1)).view(m.weight.shape)
            torch.testing.assert_close(m.weight.data, want, rtol=0, atol=1e-5)

# --- training an adapter (add_lora) and saving it (lora_state_dict, save_lora_weights) ---

def add_both(pipe, seed=0, unet_targets=UNET_TARGETS):
    g = torch.Generator().manual_seed(seed)
    return [add_lora(pipe.unet, targets=unet_targets, generator=g),
            add_lora(pipe.text_encoder, targets=TEXT_ENCODER_TARGETS, generator=g)]

def test_add_lora_trains_only_the_adapter(folder):
    ours = StableDiffusionPipeline.from_pretrained(folder)
    base, snap = outputs(ours), snapshot(ours)
    params = add_both(ours)
    assert all(torch.equal(u, v) for u, v in zip(outputs(ours), base))              # B = 0: the base model exactly
    x0, _, _, ids = inputs()
    scheduler = DDPMScheduler()
    def loss_fn(step):   # one batch, one t and noise: the loss of a model that learns must fall
        emb = ours.text_encoder(ids)[0]
        return ddpm_loss(ours.unet, scheduler, x0, torch.Generator().manual_seed(0), encoder_hidden_states=emb)
    res = fit(params, loss_fn, steps=20, lr=1e-2, warmup=1, progress=False)
    print('loss', res.losses[0], '->', res.losses[-1])
    assert np.isfinite(res.losses).all() and res.losses[-1] < 0.9 * res.losses[0]
    now = snapshot(ours)
    assert all(torch.equal(snap[k], now[k]) for k in snap)                          # the base weights are frozen
    assert all(p.abs().sum() > 0 for pl in params for p in pl[1::2])                # every B has moved
    assert max_err(outputs(ours), base) > 1e-3

def test_add_lora_errors(folder):
    ours = StableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match='named like'): add_lora(ours.unet, targets=('q_proj',))
    add_lora(ours.unet)
    with pytest.raises(ValueError, match='already in use'): add_lora(ours.unet)
    add_lora(ours.unet, adapter_name='second')
    assert ours.get_active_adapters() == ['default_0', 'second']
    with pytest.raises(ValueError, match='at least one'): StableDiffusionPipeline.save_lora_weights(folder.parent/'x')

def test_trained_adapter_round_trips_and_matches_diffusers(folder, tmp_path):
    "A trained adapter (here: random numbers, Linear and 1x1 convolutions) saved, loaded by us and by diffusers + peft."
    ours = StableDiffusionPipeline.from_pretrained(folder)
    params = add_both(ours, unet_targets=UNET_TARGETS + ('proj_in', 'proj_out'))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (p for pl in params for p in pl): p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    trained = outputs(ours)
    f = StableDiffusionPipeline.save_lora_weights(tmp_path/'lora', unet_lora_layers=lora_state_dict(ours.unet),
                                                  text_encoder_lora_layers=lora_state_dict(ours.text_encoder))
    assert f.name == 'pytorch_lora_weights.safetensors'
    fresh, ref = new_pipes(folder)
    fresh.load_lora_weights(f.parent); ref.load_lora_weights(str(f.parent))
    assert all(torch.equal(u, v) for u, v in zip(outputs(fresh), trained))          # bit for bit
    assert max_err(trained, outputs(StableDiffusionPipeline.from_pretrained(folder))) > 1e-2
    assert_close(outputs(fresh), outputs(ref))
    assert_close(outputs(fresh, ours_scale=0.5), outputs(ref, ref_scale=0.5))
    kw = dict(num_inference_steps=2, output_type='np', height=32, width=32, cross_attention_kwargs={'scale': 0.5})
    a = fresh('a red ring', generator=torch.Generator().manual_seed(0), **kw).images
    b = ref('a red ring', generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(a).all() and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    print('trained adapter vs diffusers', max_err(outputs(fresh), outputs(ref)), 'images', np.abs(a - b).max())

def test_lora_state_dict_converts_kohya_with_alpha(folder, tmp_path):
    "alpha / r folded into B: a kohya file with per-module alphas, saved in diffusers' format, gives the same outputs."
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.load_lora_weights(kohya_file(ours, tmp_path/'k.safetensors', alphas=(2.0, 8.0)))
    a = outputs(ours)
    sd = {'unet': lora_state_dict(ours.unet), 'text_encoder': lora_state_dict(ours.text_encoder)}
    assert all(k.endswith(('.lora_A.weight', '.lora_B.weight')) for d in sd.values() for k in d)
    f = StableDiffusionPipeline.save_lora_weights(tmp_path/'c', sd['unet'], sd['text_encoder'], weight_name='c.safetensors')
    fresh = StableDiffusionPipeline.from_pretrained(folder)
    fresh.load_lora_weights(f)
    assert_close(outputs(fresh), a, atol=1e-5)
    assert lora_state_dict(fresh.unet, 'nothing') == {}
