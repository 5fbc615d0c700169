"CLIPTextModel: parity with transformers (tiny and full SD v1.5 config), checkpoint variants, errors, benchmark."
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file, save_file
from minidiff.core import CheckpointNotFoundError
from minidiff.loading import CheckpointError
from minidiff.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID
from minidiff.text_encoder import CLIPTextModel

import transformers
transformers.utils.logging.disable_progress_bar(); transformers.utils.logging.set_verbosity_error()

SD15_CONFIG = {  # stable-diffusion-v1-5 text_encoder/config.json, verbatim
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408}
TINY = {**SD15_CONFIG, 'hidden_size': 32, 'intermediate_size': 64, 'num_attention_heads': 4, 'num_hidden_layers': 2,
        'projection_dim': 32}
TOL = dict(rtol=1e-5, atol=1e-5)   # hidden states are LayerNorm outputs of order 1


def write_sd15_text_encoder(folder, config, seed=0, fp16=True, bin=True):
    "Seeded transformers CLIPTextModel saved like SD v1.5's text_encoder/ (prefixed keys + int64 position_ids)."
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    folder = Path(folder); ref.save_pretrained(folder)
    (folder/'config.json').write_text(json.dumps(config, indent=2))
    sd = {f'text_model.{k}': v for k, v in load_file(folder/'model.safetensors').items()}
    sd['text_model.embeddings.position_ids'] = torch.arange(config['max_position_embeddings'])[None]
    save_file(sd, folder/'model.safetensors', metadata={'format': 'pt'})
    if fp16: save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                       folder/'model.fp16.safetensors', metadata={'format': 'pt'})
    if bin: torch.save(sd, folder/'pytorch_model.bin')
    return ref


def prompt_batch(L=77, seed=0):
    "Ids and mask as the tokenizer gives them: short, empty and over-long (truncated to L) prompts, EOS-padded."
    g = torch.Generator().manual_seed(seed)
    prompts = [[320, 1125, 539, 320, 2368], [], torch.randint(0, 49406, (120,), generator=g).tolist(), [3306, 1002]]
    ids, mask = [], []
    for toks in prompts:
        toks = toks[:L - 2]                                  # truncation=True keeps BOS ... EOS
        n = len(toks) + 2
        ids.append([BOS_TOKEN_ID, *toks, EOS_TOKEN_ID] + [EOS_TOKEN_ID] * (L - n))
        mask.append([1] * n + [0] * (L - n))
    return torch.tensor(ids), torch.tensor(mask)


def assert_parity(ours, ref, ids, mask, hidden_states=True):
    "Compare every output of ours and transformers' model; return the largest absolute difference."
    with torch.no_grad():
        o = ours(ids, attention_mask=mask, output_hidden_states=hidden_states)
        r = ref(ids, attention_mask=mask, output_hidden_states=hidden_states)
    torch.testing.assert_close(o.last_hidden_state, r.last_hidden_state, **TOL)
    torch.testing.assert_close(o.pooler_output, r.pooler_output, **TOL)
    torch.testing.assert_close(o[0], r[0], **TOL)
    if hidden_states:
        assert len(o.hidden_states) == len(r.hidden_states)
        for a, b in zip(o.hidden_states, r.hidden_states): torch.testing.assert_close(a, b, **TOL)
    return max((o.last_hidden_state - r.last_hidden_state).abs().max().item(),
               (o.pooler_output - r.pooler_output).abs().max().item())


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sd15') / 'text_encoder'
    ref = write_sd15_text_encoder(folder, TINY)
    return folder, ref


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize('with_mask', [False, True])
@pytest.mark.parametrize('L', [77, 12])
def test_parity_tiny(tiny, with_mask, L):
    folder, ref = tiny
    ours = CLIPTextModel.from_pretrained(folder.parent, subfolder='text_encoder')
    ids, mask = prompt_batch(L)
    assert_parity(ours, ref, ids, mask if with_mask else None)


def test_parity_left_padding_and_transformers_loading(tiny):
    "Masks with leading zeros (fully masked query rows) and transformers' own loading of the legacy folder."
    folder, _ = tiny
    ours = CLIPTextModel.from_pretrained(folder)
    ref = transformers.CLIPTextModel.from_pretrained(folder).eval()
    ids, mask = prompt_batch(16)
    mask[0, :3] = 0
    assert_parity(ours, ref, ids, mask)


@pytest.mark.parametrize('eos_token_id,hidden_act', [(EOS_TOKEN_ID, 'quick_gelu'), (EOS_TOKEN_ID, 'gelu'), (2, 'gelu'),
                                                         (2, 'relu')])
def test_parity_other_configs(tmp_path, eos_token_id, hidden_act):
    "Newer configs pool at the first EOS; legacy ones at argmax(input_ids): padding with id 0 tells them apart."
    cfg = {**TINY, 'eos_token_id': eos_token_id, 'hidden_act': hidden_act}
    ref = write_sd15_text_encoder(tmp_path, cfg, seed=3, fp16=False, bin=False)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids, mask = prompt_batch(20)
    ids[0, 8:] = 0; ids[1, 5] = EOS_TOKEN_ID
    assert_parity(ours, ref, ids, None)
    assert_parity(ours, ref, ids, mask)


def test_default_config_matches_transformers_defaults():
    ours = CLIPTextModel()
    ref = transformers.CLIPTextConfig()
    for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'projection_dim', 'num_hidden_layers',
              'num_attention_heads', 'max_position_embeddings', 'hidden_act', 'layer_norm_eps', 'attention_dropout',
              'initializer_range', 'initializer_factor', 'pad_token_id', 'bos_token_id', 'eos_token_id'):
        assert ours.config[k] == getattr(ref, k), k


@pytest.mark.slow
@pytest.mark.parametrize('with_mask', [False, True])
def test_parity_full_sd15_config(tmp_path_factory, with_mask):
    "The real SD v1.5 text-encoder config (123M parameters), seeded random weights, rtol 1e-5."
    folder = tmp_path_factory.mktemp('full')
    ref = write_sd15_text_encoder(folder, SD15_CONFIG, fp16=False, bin=False)
    ours = CLIPTextModel.from_pretrained(folder)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    ids, mask = prompt_batch(77)
    err = assert_parity(ours, ref, ids, mask if with_mask else None)
    print(f"full SD v1.5 config, mask={with_mask}: max abs error {err:.3g}")


# ---------------------------------------------------------------- checkpoints

def test_fp16_variant(tiny):
    folder, _ = tiny
    fp32 = CLIPTextModel.from_pretrained(folder)
    fp16 = CLIPTextModel.from_pretrained(folder, variant='fp16', torch_dtype=torch.float16)
    assert fp16.dtype == torch.float16
    for k, v in fp32.state_dict().items(): assert torch.equal(fp16.state_dict()[k], v.half()), k
    ref = transformers.CLIPTextModel.from_pretrained(folder, variant='fp16', dtype=torch.float16).eval()
    ids, mask = prompt_batch(77)
    with torch.no_grad():
        o, r = fp16(ids), ref(ids)
    assert o.last_hidden_state.dtype == torch.float16
    torch.testing.assert_close(o.last_hidden_state, r.last_hidden_state, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(o.pooler_output, r.pooler_output, rtol=1e-3, atol=1e-3)


def test_outputs_and_config_of_a_small_model():
    "Moved from 08_text_encoder: tuple and attribute access agree, every layer's state, the config, the length check."
    torch.manual_seed(0)
    te = CLIPTextModel.from_config({**SD15_CONFIG, 'hidden_size': 64, 'intermediate_size': 256,
                                    'num_attention_heads': 4, 'num_hidden_layers': 3, 'projection_dim': 64}).eval()
    ids, _ = prompt_batch()
    with torch.no_grad(): out = te(ids, output_hidden_states=True)
    assert out[0] is out.last_hidden_state and len(out.hidden_states) == 3 + 1
    assert torch.isfinite(out.last_hidden_state).all()
    assert te.config.eos_token_id == 2 and te.config.model_type == 'clip_text_model'
    with pytest.raises(ValueError, match='truncate the prompt'): te(torch.ones(1, 80, dtype=torch.long))


def test_loaded_config_and_fp16_weights(tiny):
    "Moved from 08_text_encoder: the file's config keys survive loading; fp16 weights are the fp32 ones rounded."
    folder, _ = tiny
    te = CLIPTextModel.from_pretrained(folder)
    te16 = CLIPTextModel.from_pretrained(folder, variant='fp16', torch_dtype=torch.float16)
    assert te.config.hidden_act == 'quick_gelu' and te.config.transformers_version == '4.22.0.dev0'
    w = 'text_model.final_layer_norm.weight'
    assert torch.equal(te16.state_dict()[w], te.state_dict()[w].half())


def test_pytorch_model_bin_with_position_ids(tiny, tmp_path):
    folder, ref = tiny
    stored = torch.load(folder/'pytorch_model.bin', weights_only=True)
    assert stored['text_model.embeddings.position_ids'].dtype == torch.int64
    for name in ('pytorch_model.bin', 'config.json'): (tmp_path/name).write_bytes((folder/name).read_bytes())
    ours = CLIPTextModel.from_pretrained(tmp_path)
    assert_parity(ours, ref, *prompt_batch(77))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in stored.items()}, tmp_path/'pytorch_model.fp16.bin')
    assert CLIPTextModel.from_pretrained(tmp_path, variant='fp16', torch_dtype=torch.float16).dtype == torch.float16


def test_safetensors_preferred_over_bin(tiny, tmp_path):
    folder, _ = tiny
    for name in ('model.safetensors', 'config.json'): (tmp_path/name).write_bytes((folder/name).read_bytes())
    (tmp_path/'pytorch_model.bin').write_bytes(b'not a pickle')   # never read while model.safetensors exists
    CLIPTextModel.from_pretrained(tmp_path)
    CLIPTextModel.from_pretrained(tmp_path, use_safetensors=True)
    with pytest.raises(CheckpointError, match='pytorch_model.bin'): CLIPTextModel.from_pretrained(tmp_path, use_safetensors=False)
    (tmp_path/'model.safetensors').unlink()
    with pytest.raises(CheckpointNotFoundError, match='looked for model.safetensors[.]'):
        CLIPTextModel.from_pretrained(tmp_path, use_safetensors=True)


def test_transformers5_files_without_prefix(tiny, tmp_path):
    "transformers 5 saves keys without `text_model.`: they load too."
    _, ref = tiny
    ref.save_pretrained(tmp_path)
    assert not any(k.startswith('text_model.') for k in load_file(tmp_path/'model.safetensors'))
    ours = CLIPTextModel.from_pretrained(tmp_path)
    assert_parity(ours, ref, *prompt_batch(77))


def test_save_pretrained_roundtrip_with_transformers(tiny, tmp_path):
    folder, ref = tiny
    ours = CLIPTextModel.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model.safetensors']
    cfg = json.loads((tmp_path/'config.json').read_text())
    assert cfg['model_type'] == 'clip_text_model' and cfg['architectures'] == ['CLIPTextModel']
    assert cfg['transformers_version'] == '4.22.0.dev0' and cfg['dropout'] == 0.0   # unknown keys kept
    assert '_class_name' not in cfg and '_use_default_values' not in cfg
    keys = set(load_file(tmp_path/'model.safetensors'))
    assert all(k.startswith('text_model.') for k in keys) and 'text_model.embeddings.position_ids' not in keys
    ref2 = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    assert ref2.config.eos_token_id == 2 and ref2.config.hidden_size == 32
    assert_parity(ours, ref2, *prompt_batch(77))
    assert_parity(CLIPTextModel.from_pretrained(tmp_path), ref, *prompt_batch(77))


def test_save_pretrained_from_scratch_is_a_transformers_config(tmp_path):
    ours = CLIPTextModel(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/'config.json').read_text())
    assert cfg['model_type'] == 'clip_text_model' and cfg['eos_token_id'] == 49407
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    assert_parity(ours.eval(), ref, *prompt_batch(10))


# ---------------------------------------------------------------- errors

@pytest.fixture(scope='module')
def small_model():
    torch.manual_seed(0)
    return CLIPTextModel(**{k: v for k, v in TINY.items() if k in CLIPTextModel._init_keys()}).eval()

@pytest.mark.parametrize('ids,exc,msg', [
    (torch.full((1, 78), 320), ValueError, '78 tokens but max_position_embeddings is 77'),
    (torch.tensor([[49406, 49408, 49407]]), ValueError, 'vocab_size=49408'),
    (torch.tensor([[49406, -5, 49407]]), ValueError, '[-5]'),
    (torch.tensor([[49406., 320., 49407.]]), TypeError, 'integer tensor'),
    (torch.tensor([[True, False]]), TypeError, 'integer tensor'),
    ([[49406, 49407]], TypeError, 'torch.Tensor'),
    (torch.tensor([49406, 49407]), ValueError, '2-D (batch, tokens)'),
    (torch.ones(1, 2, 3, dtype=torch.long), ValueError, '2-D (batch, tokens)'),
    (torch.ones(1, 0, dtype=torch.long), ValueError, 'no tokens'),
])
def test_bad_input_ids(small_model, ids, exc, msg):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    with pytest.raises(exc) as e: small_model(ids)
    assert msg in str(e.value)
    assert all(torch.equal(v, small_model.state_dict()[k]) for k, v in before.items())


def test_bad_attention_mask(small_model):
    ids = torch.tensor([[49406, 320, 49407]])
    with pytest.raises(ValueError, match='attention_mask must be a tensor of the shape of input_ids'):
        small_model(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match='attention_mask'):
        small_model(ids, attention_mask=[[1, 1, 1]])
    small_model(ids, attention_mask=torch.ones(1, 3, dtype=torch.bool))   # bool, int and float masks are fine


@pytest.mark.parametrize('kwargs,msg', [
    (dict(hidden_act='tanh'), "unsupported hidden_act 'tanh'"),
    (dict(hidden_size=30, num_attention_heads=4), 'hidden_size 30 is not a multiple of num_attention_heads 4'),
    (dict(eos_token_id=[49407, 2]), 'eos_token_id must be one token id'),
])
def test_bad_config(kwargs, msg):
    with pytest.raises(ValueError) as e: CLIPTextModel(**{'hidden_size': 32, 'num_attention_heads': 4, **kwargs})
    assert msg in str(e.value)


def test_missing_and_mismatched_weights(tiny, tmp_path):
    folder, _ = tiny
    (tmp_path/'config.json').write_text((folder/'config.json').read_text())
    with pytest.raises(CheckpointNotFoundError, match='model.safetensors, pytorch_model.bin'):
        CLIPTextModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match='model.fp16.safetensors, pytorch_model.fp16.bin'):
        CLIPTextModel.from_pretrained(tmp_path, variant='fp16')
    sd = load_file(folder/'model.safetensors')
    del sd['text_model.final_layer_norm.bias']
    sd['text_model.encoder.layers.0.mlp.fc1.weight'] = torch.zeros(3, 3)
    save_file(sd, tmp_path/'model.safetensors')
    with pytest.raises(CheckpointError) as e: CLIPTextModel.from_pretrained(tmp_path)
    assert 'text_model.final_layer_norm.bias' in str(e.value) and 'mlp.fc1.weight' in str(e.value)


# ---------------------------------------------------------------- benchmark

BENCH = textwrap.dedent('''
    import sys, time, torch
    def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
    torch.set_num_threads(1)
    which, folder = sys.argv[1], sys.argv[2]
    if which == 'ours':
        from minidiff.text_encoder import CLIPTextModel
        model = CLIPTextModel.from_pretrained(folder)
    else:
        import transformers; transformers.utils.logging.set_verbosity_error()
        model = transformers.CLIPTextModel.from_pretrained(folder).eval()
    load_peak, rss = kb('VmHWM'), kb('VmRSS')
    ids = torch.full((2, 77), 49407); ids[:, 0] = 49406; ids[0, 1:6] = torch.tensor([320, 1125, 539, 320, 2368])
    with torch.no_grad():
        model(ids)
        open('/proc/self/clear_refs', 'w').write('5')      # reset the peak (VmHWM) to the current RSS
        rss = kb('VmRSS'); times = []
        for _ in range(5):
            t = time.process_time(); model(ids); times.append(time.process_time() - t)
    print(min(times), load_peak, kb('VmHWM') - rss)
''')

@pytest.mark.benchmark
def test_benchmark_vs_transformers(tmp_path):
    "Full SD v1.5 config on CPU (1 thread): forward CPU time (batch 2 x 77), peak memory of loading and of a forward."
    write_sd15_text_encoder(tmp_path, SD15_CONFIG, fp16=False, bin=False)
    res = {}
    for which in ('ours', 'transformers'):
        out = subprocess.run([sys.executable, '-c', BENCH, which, str(tmp_path)], capture_output=True, text=True, check=True)
        res[which] = [float(x) for x in out.stdout.split()]
    (t_o, load_o, fwd_o), (t_r, load_r, fwd_r) = res['ours'], res['transformers']
    print(f"\nCLIP text encoder, SD v1.5 config, CPU 1 thread: forward {t_o*1e3:.0f} ms vs transformers {t_r*1e3:.0f} ms "
          f"(ratio {t_o/t_r:.2f}); peak RSS of loading {load_o/1024:.0f} MB vs {load_r/1024:.0f} MB (ratio {load_o/load_r:.2f}); "
          f"extra peak RSS of a forward {fwd_o/1024:.1f} MB vs {fwd_r/1024:.1f} MB")
    assert t_o / t_r < 1.5 and load_o / load_r < 1.5
