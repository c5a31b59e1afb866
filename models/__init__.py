"""Backbones and frozen encoders. MODELS maps every model name to its constructor:
"SiT-*" (flow matching, models/sit.py) and "DiT-*" (DDPM, models/dit.py), sizes S/B/L/XL, patches 2/4/8."""

from models.dit import DiT_models
from models.sit import SiT_models

MODELS = {**SiT_models, **DiT_models}
