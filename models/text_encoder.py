"""The frozen text encoder of the text-to-image path: CLIP ViT-L/14's text transformer.

U-ViT's MS-COCO features, which REPA's T2I experiments train on, are the *last hidden state* of
`openai/clip-vit-large-patch14`'s text transformer: every caption is tokenized to exactly 77 tokens
(truncated, padded with the end-of-text token), run through the transformer without an attention mask,
and all 77 x 768 outputs are kept (U-ViT's FrozenCLIPEmbedder). The empty caption "" encoded the same way
is the null condition of classifier-free guidance (`empty_context.npy`).

Weights are looked for in this order, as for the VAE and the image encoders:
  1. a local folder (`--text-encoder /path`) holding the transformers files (config.json, weights,
     tokenizer files), e.g. one written by `CLIPTextModel.save_pretrained` + `CLIPTokenizer.save_pretrained`;
  2. the Hugging Face cache or hub under the hub name (HF_HUB_OFFLINE=1 is honoured).
Offline with nothing cached, TextEncoderNotFoundError names what to fetch.

`weights="random"` builds a small randomly initialised CLIP text transformer with a deterministic word-hash
tokenizer (no files needed). It exists for the CPU demo and the tests, warns loudly, and never stands in
for CLIP: its tokens mean nothing, and a model trained on them can only be sampled with the same encoder.
"""

import os
import warnings
import zlib

import torch

CLIP_L14_TEXT = "openai/clip-vit-large-patch14"  # U-ViT's / the official REPA T2I text encoder
MAX_LENGTH = 77  # CLIP's context length: every caption becomes 77 tokens
# The random stand-in (demo, tests): a 2-layer CLIP text transformer of this width over a word-hash vocabulary.
RANDOM_VOCAB = 4096
RANDOM_LAYERS = 2
RANDOM_SEED = 0  # random weights are a function of (width) alone, so preprocessing and sampling agree


class TextEncoderNotFoundError(OSError):
    """The text encoder's files are not here: offline with an empty cache, or a missing local folder."""


class HashTokenizer:
    """A deterministic stand-in for CLIP's BPE tokenizer, for random-weight runs only: lower-cased words
    (split on whitespace) -> crc32 % (vocab - 2); begin token vocab - 2, end token vocab - 1, padded with the
    end token to 77 like CLIP's. Not CLIP's tokenization: tokens of this and of CLIP are incomparable."""

    def __init__(self, vocab_size=RANDOM_VOCAB, max_length=MAX_LENGTH):
        self.vocab_size, self.max_length = vocab_size, max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(N,) captions -> (N, 77) int64 token ids."""
        rows = []
        for caption in captions:
            words = [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in caption.lower().split()]
            ids = [self.bos, *words[: self.max_length - 2], self.eos]
            rows.append(ids + [self.eos] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class TextEncoder:
    """Captions -> (N, 77, width) float32 tokens (the last hidden state), frozen, in eval mode."""

    def __init__(self, model, tokenize, name: str, weights_source: str):
        self.model, self.tokenize = model.eval().requires_grad_(False), tokenize
        self.name, self.weights_source = name, weights_source
        self.width = model.config.hidden_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        out = []
        for start in range(0, len(captions), batch_size):
            ids = self.tokenize(list(captions[start : start + batch_size])).to(self.device)
            # No attention mask, as U-ViT's FrozenCLIPEmbedder: padding tokens are encoded too (causal mask only).
            out.append(self.model(input_ids=ids).last_hidden_state.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, MAX_LENGTH, self.width)

    def describe(self) -> dict:
        """What made the tokens: stored next to preprocessed data and in checkpoints."""
        return {"name": self.name, "weights": self.weights_source, "width": self.width, "max_length": MAX_LENGTH}


def _clip_tokenizer(tokenizer):
    def tokenize(captions):
        batch = tokenizer(captions, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
        return batch["input_ids"]

    return tokenize


def random_text_encoder(width: int = 768, device="cpu") -> TextEncoder:
    """A randomly initialised 2-layer CLIP text transformer of `width` with the hash tokenizer (loud warning)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    warnings.warn(
        f"RANDOM TEXT ENCODER (width {width}): caption tokens come from an untrained {RANDOM_LAYERS}-layer CLIP "
        "text transformer with a word-hash tokenizer. This checks the pipeline; it is not CLIP.",
        stacklevel=2,
    )
    heads = max(h for h in (12, 8, 4, 2, 1) if width % h == 0)
    config = CLIPTextConfig(
        vocab_size=RANDOM_VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=RANDOM_LAYERS,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=RANDOM_VOCAB - 2,
        eos_token_id=RANDOM_VOCAB - 1,
        pad_token_id=RANDOM_VOCAB - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = CLIPTextModel(config)
    return TextEncoder(model.to(device), HashTokenizer(), f"random-clip-text-w{width}", "random")


def load_text_encoder(name: str = CLIP_L14_TEXT, device="cpu", weights: str = "pretrained", width: int = 768):
    """The frozen text encoder: `name` a hub name or a local folder; weights="random" for pipeline checks
    (then `width` sets its token width and `name` is ignored)."""
    if weights == "random":
        return random_text_encoder(width, device)
    if weights != "pretrained":
        raise ValueError(f"text encoder weights must be 'pretrained' or 'random', got {weights!r}")
    from transformers import CLIPTextModel, CLIPTokenizer

    local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name)
    if local and not os.path.isdir(name):
        raise TextEncoderNotFoundError(f"--text-encoder {name}: no such folder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name)
        model = CLIPTextModel.from_pretrained(name)
    except OSError as e:  # huggingface_hub's "not in the local cache" / "cannot connect", or missing files
        if local:
            raise TextEncoderNotFoundError(
                f"--text-encoder {name}: the folder does not hold a CLIPTextModel and CLIPTokenizer ({e})"
            ) from e
        raise TextEncoderNotFoundError(
            f'cannot find the text encoder {name!r} ({e}). With network access, fetch it once: `python -c "from '
            f"transformers import CLIPTextModel, CLIPTokenizer; CLIPTokenizer.from_pretrained('{name}'); "
            f"CLIPTextModel.from_pretrained('{name}')\"`; or pass --text-encoder /local/folder holding both"
        ) from e
    return TextEncoder(model.to(device), _clip_tokenizer(tokenizer), name, "pretrained")
