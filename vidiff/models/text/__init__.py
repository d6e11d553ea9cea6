"""Frozen text encoders: BERT/MiniLM (default), T5/umT5 and CLIP, in Flax.

    from vidiff.models.text import text_encoder
    enc = text_encoder("minilm")                 # or "t5:<dir>", "clip:<dir>", "bert:<dir>"
    emb = enc.encode(["a red ball bouncing", ""])
    emb.tokens (B, L, D), emb.mask (B, L), emb.pooled (B, D'), emb.truncated (B,)

Weights are Hugging Face safetensors (PyTorch parameter names), read offline
from a directory, an installed package or the local Hub cache. Each model file
(``bert``, ``t5``, ``clip``) is usable on its own: ``Config.from_hf``, the
linen module, and ``params_from_hf``.
"""
from vidiff.models.text.bert import Bert, BertConfig
from vidiff.models.text.clip import CLIPTextConfig, CLIPTextEncoder
from vidiff.models.text.common import TextOutput
from vidiff.models.text.encoder import TextEmbeddings, TextEncoder, load_text_encoder, text_encoder
from vidiff.models.text.loading import Tokenizer, Tokens, resolve_model_dir
from vidiff.models.text.registry import KINDS, PRESETS
from vidiff.models.text.t5 import T5Config, T5Encoder

__all__ = [
    "Bert", "BertConfig", "CLIPTextConfig", "CLIPTextEncoder", "KINDS", "PRESETS", "T5Config", "T5Encoder",
    "TextEmbeddings", "TextEncoder", "TextOutput", "Tokenizer", "Tokens", "load_text_encoder",
    "resolve_model_dir", "text_encoder",
]
