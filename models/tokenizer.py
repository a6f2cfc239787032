"""BLIP's text tokenizer: ``bert-base-uncased`` WordPiece plus the [DEC] and [ENC] special tokens.

The vocabulary is always read from a local directory (the official ``bert-base-uncased`` files or the
built-in synthetic world's ``tokenizer/``), never fetched from the hub. Token ids differ between the
two vocabularies ([CLS] is 101 in BERT and 2 in the synthetic world), so callers must read every id
from the returned tokenizer instead of hard-coding it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import BertTokenizer

__all__ = ["DECODER_TOKEN", "ENCODER_TOKEN", "init_tokenizer"]

DECODER_TOKEN = "[DEC]"
ENCODER_TOKEN = "[ENC]"
_EXPECTED_FILES = "vocab.txt (one WordPiece token per line) and optionally tokenizer_config.json"


def init_tokenizer(path: str | Path) -> BertTokenizer:
    """Load a ``bert-base-uncased``-style tokenizer from ``path`` and add BLIP's special tokens.

    [DEC] becomes the BOS token (``tokenizer.bos_token_id``), which starts every decoder input;
    [ENC] is an additional special token (``tokenizer.enc_token_id``) that replaces [CLS] in front of
    image-grounded encoder inputs. Both are appended after the existing vocabulary, so with the
    official vocabulary they get ids 30522 and 30523.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; expected a directory with {_EXPECTED_FILES}"
        )
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"tokenizer directory {path} has no vocab.txt; expected {_EXPECTED_FILES}")
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": DECODER_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENCODER_TOKEN]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids(ENCODER_TOKEN)
    return tokenizer
