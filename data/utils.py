"""Text pre-processing, image and annotation reading shared by every dataset family.

``pre_caption`` and ``pre_question`` reproduce BLIP's normalisation character for character: the
released checkpoints were trained on exactly these strings, so a "cleaner" tokenisation would shift
the inputs the models expect.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 50) -> str:
    """Lower-case, blank out ``. ! " ( ) * # : ; ~``, collapse whitespace runs, keep ``max_words`` words.

    Only runs of two or more whitespace characters are collapsed, and words are split on single
    spaces, so a lone tab or newline inside the text survives (as it does in BLIP).
    """
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def pre_question(text: str, max_words: int = 50) -> str:
    """Lower-case, delete (not blank out) the ``pre_caption`` characters, strip trailing spaces.

    Unlike ``pre_caption`` there is no whitespace collapsing and leading spaces are kept, so
    ``"what's this?  (a)"`` becomes ``"what's this?  a"``.
    """
    text = _PUNCTUATION.sub("", text.lower()).rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


class ImageLoadError(OSError):
    """An image is missing or unreadable; the message names the file and the annotation entry."""


def _describe_entry(entry: Any, index: int | None, source: str | os.PathLike | None) -> str:
    where = []
    if index is not None:
        where.append(f"entry {index}")
    if source is not None:
        where.append(f"of {os.fspath(source)}")
    text = " ".join(where) or "annotation entry"
    if entry is not None:
        try:
            content = json.dumps(entry, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            content = repr(entry)
        if len(content) > 500:
            content = content[:500] + "..."
        text += f": {content}"
    return text


def load_image(
    path: str | os.PathLike,
    entry: Any = None,
    index: int | None = None,
    source: str | os.PathLike | None = None,
) -> Image.Image:
    """Read ``path`` fully and return it as an RGB image.

    ``entry``, ``index`` and ``source`` (the annotation file) only serve the error message, so a
    bad image in a 100k-entry split can be traced back to the line that refers to it. Decoding is
    forced with ``load()`` so that a truncated file fails here rather than being silently padded
    later (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was switched on globally elsewhere).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL signals bad data with many exception types; all mean "unreadable"
        reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        message = f"cannot read image {os.fspath(path)} ({reason})"
        if entry is not None or index is not None or source is not None:
            message += f"; referenced by {_describe_entry(entry, index, source)}"
        raise ImageLoadError(message) from e


def load_annotation(ann_root: str | os.PathLike, filename: str) -> tuple[list, Path]:
    """Load a JSON annotation list; a missing file is an error that names the expected path."""
    path = Path(ann_root) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file not found: {path} (annotations are never downloaded; put the official "
            f"{filename} there, or point ann_root at a directory that has it)"
        )
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise TypeError(f"annotation file {path} must hold a JSON list, got {type(data).__name__}")
    if not data:
        # An empty evaluation split would score 0 of 0 (and could be picked as the best epoch); an empty
        # training file is a broken download or a wrong path just the same.
        raise ValueError(f"annotation file {path} holds no entries")
    return data, path


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, entry) of every non-blank line of a JSON-lines annotation file; a missing file, a line that is
    not JSON or not a JSON object is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file not found: {path} (annotations are never downloaded; put the official "
            f"{path.name} there, or point ann_root at a directory that has it)"
        )
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from e
            if not isinstance(entry, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(entry).__name__}")
            out.append((number, entry))
    return out


Transform = Callable[[Image.Image], Any]


class AnnotationDataset(Dataset):
    """A dataset over one or more JSON annotation lists whose entries name image files.

    ``sources[i]`` is the annotation file entry ``i`` came from, so errors can point at it.
    """

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform
        self.annotation: list[dict] = []
        self.sources: list[Path] = []
        self._offsets: list[int] = []

    def _add_annotation(self, ann_root: str | os.PathLike, filename: str) -> None:
        self._add_entries(*load_annotation(ann_root, filename))

    def _add_entries(self, entries: list, path: Path) -> None:
        """Append the ``entries`` read from the annotation file ``path`` (an empty list is an error naming it)."""
        if not entries:
            raise ValueError(f"annotation file {path} holds no entries")
        self._offsets.append(len(self.annotation))
        self.annotation.extend(entries)
        self.sources.append(path)

    def _source_of(self, index: int) -> tuple[Path, int]:
        """(annotation file, index inside that file) of global entry ``index``."""
        file_index = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[file_index], index - self._offsets[file_index]

    def _load(self, root: str | os.PathLike, rel_path: str, index: int) -> Any:
        source, local_index = self._source_of(index)
        image = load_image(os.path.join(root, rel_path), self.annotation[index], local_index, source)
        return self.transform(image) if self.transform is not None else image

    def __len__(self) -> int:
        return len(self.annotation)
