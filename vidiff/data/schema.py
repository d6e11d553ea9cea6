"""The one record schema every source yields, and its byte format in prepared shards.

A record is a dict:

==================  =========================================================
``video``           ``uint8 (T, H, W, 3)``
``caption``         ``str`` ("" after caption dropout)
``fps``             ``np.float32``, frames per second of ``video``
``id``              ``str``, where the clip came from
``labels``          optional dict of JSON-able values (class ids, attributes)
``latents``         optional float ``(t, h, w, c)``, precomputed VAE latents
``text_embedding``  optional float ``(N, D)`` with ``text_mask`` bool ``(N,)``
==================  =========================================================

A latents-only read (``decode_record(data, frames=False)``, for a DiT trained on
``vidiff prepare --latents`` shards, which never reads the frames) has
``video_shape`` int ``(4,)``, the stored clip's ``(T, H, W, 3)``, in place of ``video``.

The pipeline adds ``bucket`` (int, index into the bucket list),
``caption_dropped`` (bool) and, with a tokeniser, ``token_ids`` /
``token_mask``.

Prepared records (``vidiff prepare``) are stored without pickle as::

    b"VDR1" | uint32 LE header length | header (JSON, UTF-8) | blobs

The header holds the caption, fps, id, labels, the frame codec and the byte
size of each blob; the blobs are one PNG or JPEG per frame, then the raw bytes
(C order) of every other array field (``latents``, ``text_embedding``, ... -
any extra ``np.ndarray`` field is kept, so later code can add fields).
"""
from __future__ import annotations

import io
import json
import math
import struct
from typing import Any, Mapping

import numpy as np

MAGIC = b"VDR1"
FRAME_FORMATS = ("png", "jpeg")
# Stored in the JSON header (the video as its encoded frames after it); any other ndarray field of a record
# goes after the frames as a raw array blob.
_NOT_ARRAY_BLOBS = ("caption", "fps", "id", "labels", "video")


def make_record(video, caption: str, fps: float, id: str, labels: Mapping | None = None, **arrays) -> dict:
    """A schema record; extra keyword arrays (``latents``, ``text_embedding``, ...) are kept as given."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"record {id}: video must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    record = {"video": video, "caption": caption, "fps": np.float32(fps), "id": id}
    if labels is not None:
        record["labels"] = dict(labels)
    record.update(arrays)
    return record


def json_safe(value, nan_to_null: bool = True):
    """``value`` in plain JSON types, in nested mappings, lists and tuples: numpy arrays and scalars become
    lists and numbers, bytes text, keys strings. The one such conversion (shard headers, world captions,
    training logs and summaries). ``nan_to_null``: every non-finite float (NaN, inf) becomes ``None``, for
    logs other tools read (NaN is not JSON, and they choke on it); data keeps them (``False``): Python's
    ``json`` reads a label's NaN back as NaN, where ``None`` would be another value."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) or not nan_to_null else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, nan_to_null) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nan_to_null) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return json_safe(value.tolist(), nan_to_null)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _encode_frame(frame: np.ndarray, frame_format: str, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(frame, "RGB")
    if frame_format == "png":
        image.save(buffer, format="PNG", compress_level=1)  # speed over a few % of size
    else:
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: small frames lose too much colour at 4:2:0
    return buffer.getvalue()


def encode_record(record: Mapping[str, Any], *, frame_format: str = "jpeg", quality: int = 95) -> bytes:
    """Serialise a schema record to the ``VDR1`` bytes stored in ArrayRecord shards."""
    if frame_format not in FRAME_FORMATS:
        raise ValueError(f"frame_format={frame_format!r} is unknown; use one of {', '.join(FRAME_FORMATS)}")
    video = np.asarray(record["video"])
    frames = [_encode_frame(frame, frame_format, quality) for frame in video]
    arrays = {k: np.ascontiguousarray(v) for k, v in record.items() if k not in _NOT_ARRAY_BLOBS and isinstance(v, np.ndarray)}
    header = {
        "caption": record["caption"],
        "fps": float(record["fps"]),
        "id": str(record["id"]),
        "labels": json_safe(record.get("labels"), nan_to_null=False),
        "video": {"shape": list(video.shape), "format": frame_format, "sizes": [len(f) for f in frames]},
        "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape), "size": v.nbytes} for k, v in arrays.items()},
    }
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *frames, *(v.tobytes() for v in arrays.values())])


def decode_record(data: bytes, *, frames: bool = True) -> dict:
    """Parse ``VDR1`` bytes back to a schema record; ``ValueError`` when they are damaged.

    ``frames=False`` skips the frame blobs (their decoding is nearly all of a record's cost): the record has
    ``video_shape`` from the header in place of ``video``, and every other field as a full read gives it."""
    from PIL import Image

    data = memoryview(data)
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise ValueError("not a vidiff record (bad magic bytes)")
    (head_len,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(bytes(data[8 : 8 + head_len]).decode("utf-8"))
        video_spec, offset = header["video"], 8 + head_len
        if frames:
            video, offset = _decode_frames(data, offset, video_spec)
        else:
            offset = _skip_frames(offset, video_spec)
        arrays = {}
        for name, spec in header["arrays"].items():
            blob = data[offset : offset + spec["size"]]
            offset += spec["size"]
            if len(blob) != spec["size"]:
                raise ValueError(f"array {name} is truncated")
            arrays[name] = np.frombuffer(blob, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes after the last blob")
        # Inside the try: a damaged byte can leave the header valid JSON with a key renamed.
        if frames:
            return make_record(video, header["caption"], header["fps"], header["id"], header.get("labels"), **arrays)
        record = {"video_shape": np.array(video_spec["shape"]), "caption": header["caption"],
                  "fps": np.float32(header["fps"]), "id": header["id"]}
        if header.get("labels") is not None:
            record["labels"] = dict(header["labels"])
        return {**record, **arrays}
    # RecursionError: a header nested thousands deep; DecompressionBombError: a frame declaring over twice
    # Pillow's limit, which Pillow refuses before its size can be compared with the header's.
    except (KeyError, TypeError, OSError, RecursionError, Image.DecompressionBombError, json.JSONDecodeError,
            UnicodeDecodeError) as e:
        raise ValueError(f"damaged record ({e.__class__.__name__}: {e})") from None


def _decode_frames(data: memoryview, offset: int, video_spec: dict) -> tuple[np.ndarray, int]:
    """The header's frames decoded from ``data`` at ``offset``, and the offset after them."""
    from PIL import Image

    height, width = _frame_size(video_spec["shape"])
    frames = []
    for index, size in enumerate(video_spec["sizes"]):
        blob = bytes(data[offset : offset + size])
        offset += size
        if len(blob) != size:  # PIL would still decode a PNG whose last bytes are cut off
            raise ValueError(f"frame {index} is truncated")
        with Image.open(io.BytesIO(blob)) as image:
            if image.size != (width, height):  # known from its header: checked before its pixels decode
                raise ValueError(f"frame {index} is {image.width}x{image.height}, the header's {width}x{height}")
            frames.append(np.asarray(image.convert("RGB"), np.uint8))
    video = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    if list(video.shape) != list(video_spec["shape"]):
        raise ValueError(f"video shape {video.shape} does not match the header's {video_spec['shape']}")
    return video, offset


def _skip_frames(offset: int, video_spec: dict) -> int:
    """The offset after the header's frame blobs, which must be one per frame of its shape (not decoded: a
    damaged frame goes unnoticed, a blob cut short or missing is found by the arrays after it)."""
    shape, sizes = video_spec["shape"], video_spec["sizes"]
    _frame_size(shape)
    if not (isinstance(sizes, list) and all(type(n) is int and n >= 0 for n in sizes)):
        raise ValueError(f"the header's frame sizes {sizes} are not byte counts")
    if len(sizes) != shape[0]:
        raise ValueError(f"the header lists {len(sizes)} frames for its video shape {shape}")
    return offset + sum(sizes)


def _frame_size(shape) -> tuple[int, int]:
    """``(height, width)`` of the header's ``(T, H, W, 3)`` video shape, refused when it is not one or its frames
    declare more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels: a damaged header would have gigabytes decoded."""
    from PIL import Image

    if not (isinstance(shape, list) and len(shape) == 4 and shape[3] == 3
            and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"the header's video shape {shape} is not (frames, height, width, 3)")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and shape[1] * shape[2] > limit:
        raise ValueError(f"the header declares {shape[2]}x{shape[1]} frames, more than the {limit} pixels Pillow "
                         "decodes without a decompression-bomb warning")
    return shape[1], shape[2]
