"""Data preparation: ImageNet (and MS-COCO) -> the official REPA layout (images/ and vae-sd/).

`dataset_tools.py convert|encode` builds the layout and `layout.py` holds the naming and storage facts that
`dataset.py` reads back; the synthetic demo set is demo/data.py's.
"""
