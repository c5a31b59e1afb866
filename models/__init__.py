"""Backbones and frozen encoders. MODELS maps every class-conditional model name to its constructor:
"SiT-*" (flow matching, models/sit.py) and "DiT-*" (DDPM, models/dit.py), sizes S/B/L/XL, patches 2/4/8.
T2I_MODELS maps the text-conditioned ones, "MMDiT-d{depth}/{patch}" (models/mmdit.py, forward(x, t, context)):
apart, because train.py and sample_ddp.py build MODELS entries with class labels (num_classes, label dropout)."""

from models.dit import DiT_models
from models.mmdit import MMDiT_models
from models.sit import SiT_models

MODELS = {**SiT_models, **DiT_models}
T2I_MODELS = dict(MMDiT_models)
