"The real Hub scheduler configs (vendored in nbs/configs) and the parity check shared by the scheduler tests."
import json
from pathlib import Path
import torch

CONFIGS = Path(__file__).parents[1]/"nbs"/"configs"
SD = json.loads((CONFIGS/"runwayml_stable-diffusion-v1-5"/"scheduler"/"scheduler_config.json").read_text())   # PNDM, SD v1.5
CAT = json.loads((CONFIGS/"google_ddpm-cat-256"/"scheduler_config.json").read_text())                        # DDPM, ddpm-cat-256


def assert_close_finite(actual, expected, **kwargs):
    "Both sides finite, then `torch.testing.assert_close`: a parity check can never pass because both sides are NaN."
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert torch.isfinite(actual).all(), f"minidiff gave {(~torch.isfinite(actual)).sum()} non-finite values"
    assert torch.isfinite(expected).all(), f"the reference gave {(~torch.isfinite(expected)).sum()} non-finite values"
    torch.testing.assert_close(actual, expected, **kwargs)
