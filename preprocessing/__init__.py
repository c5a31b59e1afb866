"""Data preparation: ImageNet -> official REPA layout (images/ and vae-sd/), and a synthetic demo set.

`dataset_tools.py convert|encode` builds the layout, `make_demo_data.py` writes a small synthetic one,
and `layout.py` holds the naming and storage facts that `dataset.py` reads back.
"""
