"""Which tokenizer a stored teacher signal is in: its name and a fingerprint in the Parquet
metadata of the teacher's (and the curated) parts.

Token ids and top-k ids mean something only in the vocabulary that wrote them. The generate stage
stamps every part it writes with the teacher's tokenizer; curation carries the stamp over; the
train stage compares it with the student's tokenizer before it uses a single id, and either uses
the ids (same fingerprint), falls back by name (sequence-level KD on the text), or stops.
Parts without a stamp carry text only. `text_codec` gives a model's tokenizer as the (encode,
decode) pair that curation and calibration read stored responses with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from distill.errors import UserError

NAME_KEY, FINGERPRINT_KEY = b"distill.tokenizer", b"distill.tokenizer_fingerprint"


def fingerprint(tokenizer) -> str:
    """A hash of what decides the ids: the vocabulary (token -> id) and the special tokens' ids."""
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), specials], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenizerStamp:
    name: str
    """The model (or tokenizer) the ids come from, as the config names it."""
    fingerprint: str

    @classmethod
    def of(cls, name: str) -> "TokenizerStamp":
        from transformers import AutoTokenizer

        from distill.model_files import resolve_model

        return cls(name, fingerprint(AutoTokenizer.from_pretrained(resolve_model(name))))

    def apply(self, table: pa.Table) -> pa.Table:
        """`table` with this stamp in its schema metadata (written with it by Parquet)."""
        meta = dict(table.schema.metadata or {})
        meta.update({NAME_KEY: self.name.encode(), FINGERPRINT_KEY: self.fingerprint.encode()})
        return table.replace_schema_metadata(meta)

    @classmethod
    def of_table(cls, schema: pa.Schema) -> "TokenizerStamp | None":
        meta = schema.metadata or {}
        if FINGERPRINT_KEY not in meta:
            return None
        return cls(meta[NAME_KEY].decode(), meta[FINGERPRINT_KEY].decode())


def read_stamp(loc, any_part: bool = False) -> TokenizerStamp | None:
    """The stamp of a folder of parts: its first part's (every part of one teacher's has the same),
    or with `any_part` (parts of several teachers, some text-only) the first stamp found."""
    import pyarrow.parquet as pq

    for path in loc.list_files(".parquet")[: None if any_part else 1]:
        stamp = TokenizerStamp.of_table(pq.read_schema(path, filesystem=loc.fs))
        if stamp is not None:
            return stamp
    return None


def text_codec(name: str) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) in the tokenizer of the model `name`: a text's ids without special tokens,
    and ids back to text without them (how curation and calibration read stored responses)."""
    from transformers import AutoTokenizer

    from distill.model_files import resolve_model

    return codec_of(AutoTokenizer.from_pretrained(resolve_model(name)))


def codec_of(tok) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """`text_codec` of a tokenizer already loaded (an engine's)."""
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"],
            lambda ids: tok.decode(ids, skip_special_tokens=True))


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids."""
    return fingerprint(a) == fingerprint(b)


class TokenizerMismatch(UserError):
    """Stored ids (or a method that needs them) and the student's tokenizer do not go together."""


def matches(stamp: TokenizerStamp | None, tokenizer) -> bool:
    """Whether ids stamped `stamp` are ids of `tokenizer`."""
    return stamp is not None and stamp.fingerprint == fingerprint(tokenizer)
