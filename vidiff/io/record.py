"""The JSON record a written file carries in its own metadata, saying how it was made (``vidiff generate``
writes its settings there): ``record_text`` (the text stored, or a one-line error where the format cannot hold
it), ``pillow_options`` (what Pillow's ``save`` takes to store it) and ``read_record`` (the record back).

Where each format holds it: mp4 and webm in the container's ``comment`` tag (PyAV; FFmpeg reads webm's back
as ``COMMENT``), png in a tEXt chunk named ``vidiff``, gif in its comment extension, jpg in its comment (COM)
segment, of at most 65533 bytes. The text is ASCII JSON (a non-ASCII prompt escaped, ``\\u2603``), so png's
Latin-1 tEXt takes any record, and a player or ``ffprobe`` shows it as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

RECORD_KEY = "vidiff"  # png: the tEXt chunk's keyword
JPEG_COMMENT_BYTES = 65533  # a COM segment's length is 16 bits, its own 2 bytes included
_PILLOW_COMMENT = (".gif", ".jpg", ".jpeg")
RECORD_SUFFIXES = (".mp4", ".webm", ".png") + _PILLOW_COMMENT


def record_text(path, record: dict) -> str:
    """``record`` as the text stored in ``path`` (by suffix), or a one-line ``ValueError`` before anything is
    written when its format holds no record or (jpg) too short a one."""
    suffix = Path(path).suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise ValueError(f"{path}: a {suffix or 'suffix-less'} file holds no record of how it was made; use "
                         f"{', '.join(RECORD_SUFFIXES)}")
    text = json.dumps(record, ensure_ascii=True)
    if suffix in (".jpg", ".jpeg") and len(text) > JPEG_COMMENT_BYTES:
        raise ValueError(f"{path}: the record of how it was made takes {len(text)} bytes, more than a jpg's "
                         f"comment holds ({JPEG_COMMENT_BYTES}); write a .png")
    return text


def pillow_options(path, text: str | None) -> dict:
    """Pillow ``save`` keywords storing ``text`` (:func:`record_text`) in the image ``path``; none for None."""
    if text is None:
        return {}
    if Path(path).suffix.lower() == ".png":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, text)
        return {"pnginfo": info}
    return {"comment": text.encode("ascii")}


def read_record(path) -> dict | None:
    """The record ``vidiff.io.write_video`` or ``write_image`` stored in ``path`` (a JSON object), or None when
    the file holds none (written without one, or by another program: a comment that is no JSON object is not a
    record). A file that is missing or cannot be opened is a one-line ``OSError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".png" or suffix in _PILLOW_COMMENT:
            from PIL import Image

            with Image.open(path) as image:
                text = image.text.get(RECORD_KEY) if suffix == ".png" else image.info.get("comment")
        else:
            import av

            with av.open(str(path)) as container:
                text = next((v for k, v in container.metadata.items() if k.lower() == "comment"), None)
    except Exception as error:  # Pillow's and PyAV's many errors for a file that is not theirs
        raise OSError(f"{path}: cannot read its record ({type(error).__name__}: {error})") from None
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
