"""The tokenizer stamp of stored teacher signals: fingerprints, and the stamp through Parquet."""

import pyarrow as pa
from transformers import AutoTokenizer

from distill.storage import locate
from distill.tokenizers import TokenizerStamp, fingerprint, matches, read_stamp, same_tokenizer


def test_the_fingerprint_follows_the_vocabulary(tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert fingerprint(tok) == fingerprint(AutoTokenizer.from_pretrained(tiny_model))  # stable across loads
    grown = AutoTokenizer.from_pretrained(tiny_model)
    grown.add_tokens(["<an_extra_token>"])
    assert fingerprint(grown) != fingerprint(tok) and not same_tokenizer(grown, tok)


def test_the_stamp_travels_in_the_parts_and_is_checked_against_a_tokenizer(tiny_model, tmp_path):
    stamp = TokenizerStamp.of(tiny_model)
    folder = locate(str(tmp_path / "teacher"))
    folder.write_part(stamp.apply(pa.table({"id": ["a"], "token_ids": [[1, 2]]})), "part-0")
    assert read_stamp(folder) == stamp
    assert matches(read_stamp(folder), AutoTokenizer.from_pretrained(tiny_model))
    grown = AutoTokenizer.from_pretrained(tiny_model)
    grown.add_tokens(["<an_extra_token>"])
    assert not matches(read_stamp(folder), grown)
    text_only = locate(str(tmp_path / "text"))
    text_only.write_part(pa.table({"id": ["a"]}), "part-0")
    assert read_stamp(text_only) is None and not matches(None, grown)
    assert read_stamp(locate(str(tmp_path / "empty"))) is None
