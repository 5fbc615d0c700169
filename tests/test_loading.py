"Loading from folders and from the Hugging Face cache (offline), and every loading error."
import json, os
from pathlib import Path
import pytest, torch
from safetensors.torch import save_file
from minidiff.core import register_to_config, resolve_file, CheckpointNotFoundError
from minidiff.loading import ModelMixin, CheckpointError
from minidiff.schedule import SchedulerMixin

class Tiny(ModelMixin):
    @register_to_config
    def __init__(self, channels=4):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, channels, 3)

class TinyScheduler(SchedulerMixin):
    @register_to_config
    def __init__(self, num_train_timesteps=1000): pass

SHA = "82ca0d5db4a5ec6ff0e9be8d86852490bc18a3d9"

def fake_cache(root, repo_id, files):
    "Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<sha>/...}."
    repo = Path(root)/("models--" + repo_id.replace("/", "--"))
    (repo/"refs").mkdir(parents=True)
    (repo/"refs"/"main").write_text(SHA)
    for name, write in files.items():
        f = repo/"snapshots"/SHA/name
        f.parent.mkdir(parents=True, exist_ok=True)
        write(f)
    return root

@pytest.fixture
def offline(monkeypatch): monkeypatch.setenv("HF_HUB_OFFLINE", "1")

@pytest.fixture
def tiny_files():
    torch.manual_seed(0)
    m = Tiny()
    def config(f): f.write_text(json.dumps({"_class_name": "Tiny", "channels": 4}))
    def weights(f): save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
    return m, config, weights

def test_load_from_offline_cache_root_layout(tmp_path, offline, tiny_files):
    m, config, weights = tiny_files
    cache = fake_cache(tmp_path, "org/flat", {"config.json": config, "diffusion_pytorch_model.safetensors": weights,
                                               "scheduler_config.json": lambda f: f.write_text('{"num_train_timesteps": 50}')})
    got = Tiny.from_pretrained("org/flat", cache_dir=cache)
    assert torch.equal(got.conv_in.weight, m.conv_in.weight)
    assert TinyScheduler.from_pretrained("org/flat", cache_dir=cache).config.num_train_timesteps == 50

def test_load_from_offline_cache_subfolder_and_variant(tmp_path, offline, tiny_files):
    m, config, weights = tiny_files
    cache = fake_cache(tmp_path, "org/sd", {"unet/config.json": config, "unet/diffusion_pytorch_model.fp16.safetensors": weights})
    got = Tiny.from_pretrained("org/sd", subfolder="unet", variant="fp16", cache_dir=cache, torch_dtype=torch.float16)
    assert got.dtype == torch.float16
    with pytest.raises(CheckpointNotFoundError, match="diffusion_pytorch_model.safetensors"):
        Tiny.from_pretrained("org/sd", subfolder="unet", cache_dir=cache)

def test_uncached_repo_offline_names_repo_and_fix(tmp_path, offline):
    with pytest.raises(CheckpointNotFoundError) as e: Tiny.from_pretrained("google/ddpm-cat-256", cache_dir=tmp_path)
    msg = str(e.value)
    assert "google/ddpm-cat-256" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg

def test_missing_local_folder():
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local folder"):
        Tiny.from_pretrained("./does/not/exist")

def test_missing_weights_file_in_folder(tmp_path, tiny_files):
    _, config, _ = tiny_files
    config(tmp_path/"config.json")
    with pytest.raises(CheckpointNotFoundError, match="No weights file"): Tiny.from_pretrained(tmp_path)

def test_missing_config_in_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json"): Tiny.from_pretrained(tmp_path)

def test_corrupt_config(tmp_path):
    (tmp_path/"config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"): Tiny.from_pretrained(tmp_path)

@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, tiny_files, damage):
    _, config, weights = tiny_files
    config(tmp_path/"config.json"); f = tmp_path/"diffusion_pytorch_model.safetensors"; weights(f)
    f.write_bytes(f.read_bytes()[:100] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"): Tiny.from_pretrained(tmp_path)

def test_corrupt_bin_names_the_file(tmp_path, tiny_files):
    _, config, _ = tiny_files
    config(tmp_path/"config.json"); (tmp_path/"diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"): Tiny.from_pretrained(tmp_path)

def test_mismatched_weights_list_keys_and_shapes(tmp_path):
    (tmp_path/"config.json").write_text(json.dumps({"channels": 8}))
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3), "extra.bias": torch.zeros(1)}, str(tmp_path/"diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as e: Tiny.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys: conv_in.bias" in msg and "unexpected keys: extra.bias" in msg
    assert "('conv_in.weight', (8, 3, 3, 3), (4, 3, 3, 3))" in msg

def test_pickle_bin_is_loaded_with_weights_only(tmp_path, tiny_files):
    m, config, _ = tiny_files
    config(tmp_path/"config.json")
    class Evil:
        def __reduce__(self): return (os.system, ("echo pwned",))
    torch.save({"conv_in.weight": m.conv_in.weight.data, "x": Evil()}, tmp_path/"diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"): Tiny.from_pretrained(tmp_path)

def test_save_pretrained_round_trip(tmp_path, tiny_files):
    m, _, _ = tiny_files
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path/"config.json").read_text())["_class_name"] == "Tiny"
    assert torch.equal(Tiny.from_pretrained(tmp_path).conv_in.bias, m.conv_in.bias)

class TinyAttn(ModelMixin):
    @register_to_config
    def __init__(self, channels=4):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_q, self.attn.to_out = torch.nn.Linear(channels, channels), torch.nn.ModuleList([torch.nn.Linear(channels, channels)])

def test_legacy_attention_names_load_and_cast(tmp_path):
    "A file with the 2022 names (written by to_legacy_keys) loads strictly, every tensor in place, cast on request."
    from safetensors.torch import load_file
    from minidiff.loading import to_legacy_keys, read_safetensors_header
    torch.manual_seed(0)
    m = TinyAttn(); m.save_pretrained(tmp_path)
    f = tmp_path/"diffusion_pytorch_model.safetensors"
    save_file(to_legacy_keys(load_file(str(f))), str(f))
    assert {"attn.query.weight", "attn.proj_attn.bias"} <= set(read_safetensors_header(f))
    m2 = TinyAttn.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert TinyAttn.from_pretrained(tmp_path, torch_dtype=torch.float16).dtype == torch.float16

def test_resolve_file_not_required(tmp_path):
    assert resolve_file(tmp_path, "nothing.json", required=False) is None
