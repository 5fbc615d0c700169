"Single-file SD v1.x checkpoints: parity with diffusers' from_single_file, the real key names, EMA/full/fp16/.ckpt files, errors."
import os
from pathlib import Path
import numpy as np
import pytest, torch
from safetensors.torch import load_file, save_file
from minidiff import (StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
                      CheckpointError, CheckpointNotFoundError, save_tiny_sd)
from minidiff.core import MICRO_SD
from minidiff.single_file import SD15_CONFIG, PART_CLASSES, to_original, ema_name, single_file_tokenizer

os.environ.setdefault('HF_HUB_OFFLINE', '1')
DATA = Path(__file__).parent/'data'
KW = dict(num_inference_steps=2, output_type='np', height=32, width=32)

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "(diffusers folder, minidiff pipeline, its single file)"
    tmp = tmp_path_factory.mktemp('sf')
    folder = save_tiny_sd(tmp/'sd')
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    return folder, pipe, pipe.save_single_file(tmp/'tiny.safetensors')

def image(pipe): return pipe('a red cat', generator=torch.Generator().manual_seed(0), **KW).images

def same_weights(a, b):
    return all(torch.equal(getattr(a, p).state_dict()[k], v) for p in PART_CLASSES for k, v in getattr(b, p).state_dict().items())

def test_images_match_diffusers_from_single_file(tiny):
    from diffusers import StableDiffusionPipeline as DPipe
    folder, pipe, file = tiny
    ours = StableDiffusionPipeline.from_single_file(file, config=folder)
    ref = DPipe.from_single_file(str(file), config=str(folder), safety_checker=None, feature_extractor=None, local_files_only=True)
    a, b = image(ours), image(ref)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    err = np.abs(a - b).max(); print('single-file images vs diffusers', err)
    assert err < 1e-4
    assert np.array_equal(a, image(pipe))                            # the round trip through the file is exact
    for p in PART_CLASSES:                                           # diffusers reads the same numbers
        ref_sd = getattr(ref, p).state_dict()
        for k, v in getattr(ours, p).state_dict().items():
            k2 = k if k in ref_sd else k.removeprefix('text_model.')  # transformers 5 drops the text_model level
            assert torch.equal(ref_sd[k2], v), k

def test_models_from_single_file_match_diffusers(tiny):
    from diffusers import UNet2DConditionModel as DUNet, AutoencoderKL as DVAE
    folder, pipe, file = tiny
    for ours_cls, ref_cls, part in ((UNet2DConditionModel, DUNet, 'unet'), (AutoencoderKL, DVAE, 'vae')):
        ours = ours_cls.from_single_file(file, config=folder)
        ref = ref_cls.from_single_file(str(file), config=str(folder), subfolder=part, local_files_only=True)
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
        assert all(torch.equal(v, getattr(pipe, part).state_dict()[k]) for k, v in ours.state_dict().items())
    te = CLIPTextModel.from_single_file(file, config=folder)
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te.state_dict().items())

def real_keys():
    return {k: eval(s) for k, s in (l.split('\t') for l in (DATA/'sd15_original.keys.txt').read_text().splitlines())}

def test_rules_give_the_real_sd15_key_names():
    "The original names and shapes of v1-5-pruned-emaonly's weights (tests/data, derived from the Hub's diffusers key lists)."
    with torch.device('meta'): models = {p: PART_CLASSES[p].from_config(SD15_CONFIG[p]) for p in PART_CLASSES}
    ours = {k: list(v.shape) for p in PART_CLASSES for k, v in to_original(models[p], p).items()}
    real = real_keys()
    real.pop('cond_stage_model.transformer.text_model.embeddings.position_ids')
    assert ours == real and len(ours) == 686 + 248 + 196

def test_diffusers_converter_reads_the_real_names_into_the_models():
    "diffusers' own converter maps every vendored original name onto exactly our SD v1.5 models' keys and shapes."
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint
    ckpt = {k: torch.empty(s, device='meta') for k, s in real_keys().items()}
    with torch.device('meta'): models = {p: PART_CLASSES[p].from_config(SD15_CONFIG[p]) for p in PART_CLASSES}
    converted = {'unet': convert_ldm_unet_checkpoint(ckpt, SD15_CONFIG['unet']), 'vae': convert_ldm_vae_checkpoint(ckpt, SD15_CONFIG['vae']),
                 'text_encoder': convert_ldm_clip_checkpoint(ckpt)}
    converted['text_encoder'].pop('text_model.embeddings.position_ids')
    for p, sd in converted.items():
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in models[p].state_dict().items()}, p

def test_ckpt_full_file_with_ema_and_training_state(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline as DPipe
    folder, pipe, file = tiny
    sd = load_file(str(file))
    unet_keys = [k for k in sd if k.startswith('model.diffusion_model.')]
    ema = {ema_name(k): sd[k] + 1 for k in unet_keys}                                   # a different average
    full = {**sd, **ema, 'model_ema.decay': torch.tensor(0.9999), 'model_ema.num_updates': torch.tensor(7),
            'betas': torch.rand(1000), 'alphas_cumprod': torch.rand(1000), 'posterior_mean_coef1': torch.rand(1000)}
    torch.save({'state_dict': full, 'global_step': 470000}, tmp_path/'full.ckpt')
    plain = StableDiffusionPipeline.from_single_file(tmp_path/'full.ckpt', config=folder)
    assert same_weights(plain, pipe)                                                    # as diffusers: the trained weights
    averaged = StableDiffusionPipeline.from_single_file(tmp_path/'full.ckpt', config=folder, extract_ema=True)
    assert all(torch.equal(averaged.unet.state_dict()[k], v + 1) for k, v in pipe.unet.state_dict().items())
    save_file(full, str(tmp_path/'full.safetensors'))
    ref = DPipe.from_single_file(str(tmp_path/'full.safetensors'), config=str(folder), safety_checker=None, feature_extractor=None, local_files_only=True)
    assert np.abs(image(plain) - image(ref)).max() < 1e-4

def test_float16_file(tiny, tmp_path):
    folder, pipe, file = tiny
    half = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    f = half.save_single_file(tmp_path/'fp16.safetensors')
    assert {v.dtype for k, v in load_file(str(f)).items() if v.is_floating_point()} == {torch.float16}
    as32 = StableDiffusionPipeline.from_single_file(f, config=folder)
    assert as32.unet.dtype == torch.float32
    assert all(torch.equal(as32.unet.state_dict()[k], v.float()) for k, v in half.unet.state_dict().items())
    as16 = StableDiffusionPipeline.from_single_file(f, config=folder, torch_dtype=torch.float16)
    assert as16.unet.dtype == as16.vae.dtype == as16.text_encoder.dtype == torch.float16

def test_older_layouts_are_accepted(tiny, tmp_path):
    "Text encoder without the text_model level (transformers < 4.x); VAE attention stored as (C, C) instead of 1x1 convs."
    folder, pipe, file = tiny
    sd = load_file(str(file))
    pre = 'cond_stage_model.transformer.text_model.'
    old = {(k.replace(pre, 'cond_stage_model.transformer.') if k.startswith(pre) else k): v.flatten(1) if v.ndim == 4 and v.shape[2:] == (1, 1) and '.mid.attn_1.' in k else v
           for k, v in sd.items()}
    save_file(old, str(tmp_path/'old.safetensors'))
    assert same_weights(StableDiffusionPipeline.from_single_file(tmp_path/'old.safetensors', config=folder), pipe)

def test_tokenizer_and_scheduler_sources(tiny):
    folder, pipe, file = tiny
    tok = CLIPTokenizer.from_pretrained(MICRO_SD, subfolder='tokenizer')
    p = StableDiffusionPipeline.from_single_file(file, config=folder, tokenizer=tok)
    assert p.tokenizer is tok
    assert type(p.scheduler).__name__ == 'PNDMScheduler' and p.scheduler.config.beta_schedule == 'scaled_linear'
    assert single_file_tokenizer(None)('a photo of a cat').input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert single_file_tokenizer(folder).model_max_length == 77

def write(tmp_path, sd, name='bad.safetensors'):
    save_file(sd, str(tmp_path/name)); return tmp_path/name

@pytest.mark.parametrize('case,msg', [
    ('sdxl', 'SDXL'), ('sd2', 'SD 2.x'), ('missing', 'missing keys: model.diffusion_model.out.2.bias'),
    ('unknown', 'unexpected keys: first_stage_model.encoder.extra.weight'), ('stray', 'not part of SD v1.x: lora_te_x.alpha'),
    ('no_vae', "no keys start with ['first_stage_model.']"), ('shape', 'shape mismatches')])
def test_wrong_files_raise_one_clear_error(tiny, tmp_path, case, msg):
    folder, pipe, file = tiny
    sd = load_file(str(file))
    bad = {'sdxl': {**sd, 'conditioner.embedders.1.model.ln_final.weight': torch.ones(2)},
           'sd2': {**sd, 'cond_stage_model.model.ln_final.weight': torch.ones(2)},
           'missing': {k: v for k, v in sd.items() if k != 'model.diffusion_model.out.2.bias'},
           'unknown': {**sd, 'first_stage_model.encoder.extra.weight': torch.ones(2)},
           'stray': {**sd, 'lora_te_x.alpha': torch.ones(1)},
           'no_vae': {k: v for k, v in sd.items() if not k.startswith('first_stage_model.')},
           'shape': {**sd, 'model.diffusion_model.out.2.bias': torch.ones(5)}}[case]
    with pytest.raises(CheckpointError, match=None) as e: StableDiffusionPipeline.from_single_file(write(tmp_path, bad), config=folder)
    assert msg in str(e.value) and 'bad.safetensors' in str(e.value), str(e.value)

def test_sd15_config_refuses_a_tiny_file_by_name(tiny):
    folder, pipe, file = tiny
    with pytest.raises(CheckpointError, match='tiny.safetensors') as e: UNet2DConditionModel.from_single_file(file)
    assert 'shape mismatches' in str(e.value) and "SD v1.5's unless config=" in str(e.value)

def test_truncated_missing_and_unsafe_files(tiny, tmp_path):
    folder, pipe, file = tiny
    data = file.read_bytes()
    (tmp_path/'cut.safetensors').write_bytes(data[:len(data) // 3])
    with pytest.raises(CheckpointError, match='cut.safetensors'): StableDiffusionPipeline.from_single_file(tmp_path/'cut.safetensors', config=folder)
    torch.save({'state_dict': load_file(str(file))}, tmp_path/'cut.ckpt')
    (tmp_path/'cut.ckpt').write_bytes((tmp_path/'cut.ckpt').read_bytes()[:100000])
    with pytest.raises(CheckpointError, match='cut.ckpt'): StableDiffusionPipeline.from_single_file(tmp_path/'cut.ckpt', config=folder)
    torch.save({'state_dict': {}, 'callback': Path('x')}, tmp_path/'pickle.ckpt')   # not allowed by weights_only=True
    with pytest.raises(CheckpointError, match='pickle.ckpt'): StableDiffusionPipeline.from_single_file(tmp_path/'pickle.ckpt', config=folder)
    with pytest.raises(CheckpointNotFoundError, match='nothing.safetensors'): StableDiffusionPipeline.from_single_file(tmp_path/'nothing.safetensors')
    with pytest.raises(ValueError, match='safetensors only'): pipe.save_single_file(tmp_path/'x.ckpt')

def test_parts_passed_by_name_are_kept(tiny):
    folder, pipe, file = tiny
    p = StableDiffusionPipeline.from_single_file(file, config=folder, vae=pipe.vae, scheduler=pipe.scheduler)
    assert p.vae is pipe.vae and p.scheduler is pipe.scheduler and same_weights(p, pipe)

@pytest.mark.skipif(not (MICRO_SD/'unet'/'diffusion_pytorch_model.safetensors').exists(), reason='micro SD weights not installed')
def test_micro_sd_single_file_round_trip_and_diffusers(tmp_path):
    "The shipped micro SD as one original-layout file: the folder's pictures bit for bit; diffusers within 1e-4."
    from diffusers import StableDiffusionPipeline as DPipe
    folder = StableDiffusionPipeline.from_pretrained(MICRO_SD)
    file = folder.save_single_file(tmp_path/'micro.safetensors')
    ours = StableDiffusionPipeline.from_single_file(file, config=MICRO_SD)
    ref = DPipe.from_single_file(str(file), config=str(MICRO_SD), safety_checker=None, feature_extractor=None, local_files_only=True)
    kw = dict(num_inference_steps=10, output_type='np')
    a, b, c = (p(['a red circle on a blue background', 'a yellow square'], generator=torch.Generator().manual_seed(0), **kw).images
               for p in (folder, ours, ref))
    assert a.shape == (2, 64, 64, 3) and np.isfinite(a).all() and np.isfinite(c).all()
    assert np.array_equal(a, b)
    err = np.abs(b - c).max(); print('micro single file vs diffusers', err)
    assert err < 1e-4
    assert same_weights(folder, ours)
