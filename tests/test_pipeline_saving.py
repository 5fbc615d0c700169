"Saving and loading options diffusers' users pass: `.bin` weights, variants, a dtype per part, a missing variant."
import pytest, torch
from minidiff import DDIMPipeline, StableDiffusionPipeline, save_tiny_sd
from minidiff.loading import VariantNotFoundError, CheckpointNotFoundError

@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return StableDiffusionPipeline.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("sd")/"tiny"))

def test_bin_and_variant_round_trip(sd, tmp_path):
    sd.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    assert (tmp_path/"unet"/"diffusion_pytorch_model.fp16.bin").exists()
    assert (tmp_path/"text_encoder"/"pytorch_model.fp16.bin").exists()
    again = StableDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    for a, b in zip(again.unet.state_dict().values(), sd.unet.state_dict().values()): assert torch.equal(a, b)

def test_missing_variant_is_a_value_error_like_diffusers(sd, tmp_path):
    sd.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`") as e:
        StableDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    assert isinstance(e.value, VariantNotFoundError) and isinstance(e.value, CheckpointNotFoundError)

def test_torch_dtype_by_part(sd, tmp_path):
    sd.save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, torch_dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    only_unet = StableDiffusionPipeline.from_pretrained(tmp_path, torch_dtype={"unet": torch.bfloat16})
    assert only_unet.vae.dtype == torch.float32

def test_optional_components_and_pixel_slicing_noop():
    assert StableDiffusionPipeline._optional_components == ["safety_checker", "feature_extractor"]
    assert DDIMPipeline._optional_components == []
    assert DDIMPipeline.enable_attention_slicing(object(), 2) is None   # diffusers' pixel pipelines do nothing either
