"""The CPU demo and REPA in miniature, in one place: the embedded demo domain (data.py: 10 classes of generated
shapes and textures), the networks trained on it (domain.py: the alignment encoder and the independent
evaluator, committed in nets/), and the miniature benchmark (miniature.py). Run as `python -m demo COMMAND`;
see demo/README.md."""
