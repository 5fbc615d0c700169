"The real Hub scheduler configs (vendored in nbs/configs), shared by the scheduler tests."
import json
from pathlib import Path

CONFIGS = Path(__file__).parents[1]/"nbs"/"configs"
SD = json.loads((CONFIGS/"runwayml_stable-diffusion-v1-5"/"scheduler"/"scheduler_config.json").read_text())   # PNDM, SD v1.5
CAT = json.loads((CONFIGS/"google_ddpm-cat-256"/"scheduler_config.json").read_text())                        # DDPM, ddpm-cat-256
