"UNet2DModel: full-size ddpm-cat-256 parity with diffusers, the real key layout, loading errors, fp16, save/load."
import json
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file, save_file
from minidiff.core import CheckpointNotFoundError
from minidiff.loading import CheckpointError, to_legacy_keys
from minidiff.unet2d import UNet2DModel

import diffusers

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG = json.loads((ROOT/"nbs/configs/google_ddpm-cat-256/config.json").read_text())
TINY_CONFIG = {**REAL_CONFIG, "block_out_channels": [32, 32, 32, 32, 32, 32]}
REAL_KEYS = Path(__file__).parent/"data"/"google_ddpm-cat-256.keys.txt"   # copied from the shared reference
WEIGHTS = "diffusion_pytorch_model.safetensors"

def reference_unet(config, seed=0):
    "diffusers' UNet2DModel with seeded weights; 1-d parameters (norms, biases) perturbed so none is trivial."
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1: p.add_(0.1 * torch.randn_like(p))
    return ref

def write_folder(folder, config, state_dict):
    "A folder laid out like google/ddpm-cat-256: the Hub config.json and legacy-named safetensors."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    (folder/"config.json").write_text(json.dumps(config, indent=2))
    sd = {k: v.contiguous() for k, v in to_legacy_keys(state_dict).items()}
    save_file(sd, str(folder/WEIGHTS), metadata={"format": "pt"})
    return folder

def compare(ours, ref, size, t):
    "Max abs and max relative error of ours vs diffusers, asserting rtol=1e-5, atol=1e-5."
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(): a, b = ours(x, t).sample, ref(x, t).sample
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return (a - b).abs().max().item(), ((a - b).abs() / b.abs().clamp_min(1e-3)).max().item()

@pytest.fixture(scope="module")
def full():
    "The real full-size config: diffusers reference and ours loaded from the legacy-named state dict (in memory)."
    ref = reference_unet(REAL_CONFIG)
    with torch.device("meta"): ours = UNet2DModel.from_config(REAL_CONFIG)
    ours.load_checked_state_dict(to_legacy_keys(ref.state_dict())).eval()
    return ours, ref

@pytest.fixture
def tiny(tmp_path):
    ref = reference_unet(TINY_CONFIG)
    return write_folder(tmp_path/"ddpm-cat", TINY_CONFIG, ref.state_dict()), ref

def test_full_config_keys_match_the_hub_file():
    hub = dict(line.split("\t") for line in REAL_KEYS.read_text().splitlines() if line.strip())
    with torch.device("meta"): ours = UNet2DModel.from_config(REAL_CONFIG)
    mine = to_legacy_keys({k: str(list(v.shape)).replace(" ", "") for k, v in ours.state_dict().items()})
    assert mine == {k: v.replace(" ", "") for k, v in hub.items()}
    assert sum(p.numel() for p in ours.parameters()) == 113_673_219

def test_full_config_parity_64(full):
    ours, ref = full
    err, rel = compare(ours, ref, 64, torch.tensor([10, 999]))
    print(f"full config 64x64: max abs {err:.2e}, max rel {rel:.2e}")

@pytest.mark.slow
def test_full_config_parity_256(full):
    ours, ref = full
    err, rel = compare(ours, ref, 256, torch.tensor([3, 700]))
    print(f"full config 256x256: max abs {err:.2e}, max rel {rel:.2e}")

def test_tiny_folder_loads_like_diffusers(tiny):
    folder, _ = tiny
    ours = UNet2DModel.from_pretrained(folder)
    ref = diffusers.UNet2DModel.from_pretrained(folder).eval()
    compare(ours, ref, 64, 999)

def test_fp16_torch_dtype(tiny):
    folder, ref = tiny
    half = UNet2DModel.from_pretrained(folder, torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())
    w = "down_blocks.4.attentions.0.to_q.weight"
    assert torch.equal(half.state_dict()[w], ref.state_dict()[w].half())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): out = half(x.half(), 10).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    with torch.no_grad(): full_out = ref(x, 10).sample
    torch.testing.assert_close(out.float(), full_out, rtol=0, atol=5e-2)

def test_save_pretrained_round_trip(tiny, tmp_path):
    folder, ref = tiny
    ours = UNet2DModel.from_pretrained(folder)
    ours.save_pretrained(tmp_path/"saved")
    again = UNet2DModel.from_pretrained(tmp_path/"saved")
    def cfg(m): return {k: v for k, v in m.config.items() if k != "_use_default_values"}
    assert cfg(again) == cfg(ours)
    for k, v in ours.state_dict().items(): assert torch.equal(again.state_dict()[k], v), k
    saved = json.loads((tmp_path/"saved"/"config.json").read_text())
    assert saved["_class_name"] == "UNet2DModel" and saved["block_out_channels"] == [32] * 6
    compare(again, diffusers.UNet2DModel.from_pretrained(tmp_path/"saved").eval(), 64, 5)

def edit_weights(folder, fn):
    f = Path(folder)/WEIGHTS
    sd = fn(load_file(str(f)))
    save_file(sd, str(f), metadata={"format": "pt"})

def test_missing_key(tiny):
    folder, _ = tiny
    edit_weights(folder, lambda sd: {k: v for k, v in sd.items() if k != "mid_block.attentions.0.query.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys: mid_block\.attentions\.0\.to_q\.bias"):
        UNet2DModel.from_pretrained(folder)

def test_unexpected_key(tiny):
    folder, _ = tiny
    edit_weights(folder, lambda sd: {**sd, "up_blocks.9.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: up_blocks\.9\.extra\.weight"):
        UNet2DModel.from_pretrained(folder)

def test_shape_mismatch_lists_key_expected_found(tiny):
    folder, _ = tiny
    edit_weights(folder, lambda sd: {**sd, "conv_in.weight": torch.zeros(32, 4, 3, 3)})
    with pytest.raises(CheckpointError, match=r"\('conv_in\.weight', \(32, 3, 3, 3\), \(32, 4, 3, 3\)\)"):
        UNet2DModel.from_pretrained(folder)

def test_config_weights_mismatch_lists_shapes(tiny):
    folder, _ = tiny
    (folder/"config.json").write_text(json.dumps({**TINY_CONFIG, "in_channels": 4}))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*conv_in\.weight"):
        UNet2DModel.from_pretrained(folder)

def test_truncated_file_names_the_file(tiny):
    folder, _ = tiny
    f = folder/WEIGHTS
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        UNet2DModel.from_pretrained(folder)

def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local folder"):
        UNet2DModel.from_pretrained(str(tmp_path/"no-such-folder"))

def test_missing_weights_file(tiny):
    folder, _ = tiny
    (folder/WEIGHTS).unlink()
    with pytest.raises(CheckpointNotFoundError, match="No weights file"):
        UNet2DModel.from_pretrained(folder)

@pytest.mark.parametrize("key,value", [("time_embedding_type", "fourier"), ("class_embed_type", "timestep"),
                                       ("num_class_embeds", 10), ("downsample_type", "resnet"), ("upsample_type", "resnet"),
                                       ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("resnet_time_scale_shift", "spatial"),
                                       ("down_block_types", ["SkipDownBlock2D"] * 6), ("act_fn", "tanh")])
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DModel.from_config({**TINY_CONFIG, key: value})

def test_block_count_mismatch():
    with pytest.raises(ValueError, match="same length"):
        UNet2DModel.from_config({**TINY_CONFIG, "block_out_channels": [32] * 5})

def test_bad_inputs():
    unet = UNet2DModel.from_config({**TINY_CONFIG, "layers_per_block": 1})
    with pytest.raises(ValueError, match="multiples of 32"):
        unet(torch.randn(1, 3, 48, 48), 1)
    with pytest.raises(ValueError, match="length 1 or 2"):
        unet(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]))

def test_scale_shift_and_head_dim_parity():
    "Config variants that ddpm-cat-256 does not use: scale_shift time conditioning, several heads, no mid attention."
    config = {**TINY_CONFIG, "block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
              "resnet_time_scale_shift": "scale_shift", "attention_head_dim": 16, "flip_sin_to_cos": True, "freq_shift": 0,
              "downsample_padding": 1, "center_input_sample": True, "mid_block_scale_factor": 1.4142}
    for extra in ({}, {"add_attention": False, "resnet_time_scale_shift": "default"}, {"attn_norm_num_groups": 8}):
        ref = reference_unet({**config, **extra})
        with torch.device("meta"): ours = UNet2DModel.from_config({**config, **extra})
        ours.load_checked_state_dict(ref.state_dict()).eval()
        compare(ours, ref, 32, torch.tensor([7, 400]))
