"""Cross-tokenizer alignment: the teacher's stored top-k, written in the teacher's vocabulary,
moved onto the student's tokens of the same response. Pure functions (no Ray, no engines).

    distill run -c configs/default.yaml student.kind=pretrained student.path=<another family>

Both tokenizations of a response spell the same bytes, so they share boundaries: byte offsets
where a teacher token and a student token both end. Between two shared boundaries lies a *group*
of teacher tokens and student tokens covering the same text. The first token of a group is
predicted, in both models, from the same text before it, so the teacher's distribution there is
a target for the student's; later tokens of a group are not (their prefixes differ) and get no
teacher row.

- A group of one teacher token and one student token (the common case: the same word) is
  *matched*: its teacher top-k ids are mapped to the student's ids of the same bytes, and a
  teacher token without such a student token gets `UNMAPPED` (its mass joins the tail of the
  K+1 partition in `losses.topk_kd`).
- Any other group is *unmatched*: its row keeps the teacher's probabilities with every id
  `UNMAPPED`, which `losses.topk_kd` compares tokenizer-free, on sorted probabilities (ULD,
  Boizard et al. 2024).

A response's first token under a SentencePiece dummy prefix space (" The" against "The") is
matched but maps none of its ids: the spellings differ by that space.

With the same tokenizer on both sides every group is matched and every id maps to itself, so the
loss is the same-tokenizer loss (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distill.losses import UNMAPPED

_METASPACE = "\u2581"


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable-character alphabet back to bytes (`bytes_to_unicode` inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(tokenizer) -> set[str]:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}


def _piece_bytes(piece: str, kinds: set[str], table: dict[str, int]) -> bytes:
    if "ByteLevel" in kinds:
        return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
    if "ByteFallback" in kinds and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(_METASPACE, " ").encode()


def vocab_bytes(tokenizer) -> list[bytes]:
    """The bytes each id spells, by id (special tokens spell nothing): the tokenizer's pieces read
    through its decoder's rules (byte-level BPE, SentencePiece's metaspace and byte fall-back)."""
    kinds, table = _decoder_types(tokenizer), _byte_level_table()
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [b"" if i in special or p is None else _piece_bytes(p, kinds, table) for i, p in enumerate(pieces)]


@dataclass(frozen=True)
class TokenizerPair:
    """What aligning one teacher's tokens to one student's needs, made once per process."""

    teacher_bytes: list[bytes]
    student_bytes: list[bytes]
    to_student: np.ndarray
    """[teacher vocabulary] int64: the student id spelling the same bytes, or UNMAPPED."""
    teacher_eos: int
    student_eos: int

    @classmethod
    def of(cls, teacher, student) -> "TokenizerPair":
        t_bytes, s_bytes = vocab_bytes(teacher), vocab_bytes(student)
        by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(s_bytes):
            if b:
                by_bytes.setdefault(b, i)
        to_student = np.array([by_bytes.get(b, UNMAPPED) if b else UNMAPPED for b in t_bytes], np.int64)
        to_student[teacher.eos_token_id] = student.eos_token_id
        return cls(t_bytes, s_bytes, to_student, teacher.eos_token_id, student.eos_token_id)


def _ends(vocab: list[bytes], ids: list[int]) -> tuple[np.ndarray, bytes]:
    spelled = [vocab[i] if 0 <= i < len(vocab) else b"" for i in ids]
    return np.cumsum([len(b) for b in spelled], dtype=np.int64), b"".join(spelled)


def _leading_space_shift(a: bytes, b: bytes) -> tuple[int, int]:
    """Bytes to drop from the front of each spelling when one has a dummy prefix space the other
    lacks (SentencePiece's `add_dummy_prefix`)."""
    if a[:1] == b" " and b[:1] != b" " and a[1:len(b) + 1].startswith(b[:8]):
        return 1, 0
    if b[:1] == b" " and a[:1] != b" " and b[1:len(a) + 1].startswith(a[:8]):
        return 0, 1
    return 0, 0


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(diff[0]) if len(diff) else n


def groups(teacher_ids: list[int], student_ids: list[int], pair: TokenizerPair) -> list[tuple[int, int, bool]]:
    """(first student position, first teacher position, one-to-one) of every group of the two
    tokenizations, up to where their spellings part (a response edited after generation).
    A final EOS on both sides is a one-to-one group of its own."""
    t_eos = bool(teacher_ids) and teacher_ids[-1] == pair.teacher_eos
    s_eos = bool(student_ids) and student_ids[-1] == pair.student_eos
    t_body, s_body = teacher_ids[:len(teacher_ids) - t_eos], student_ids[:len(student_ids) - s_eos]
    t_ends, t_text = _ends(pair.teacher_bytes, t_body)
    s_ends, s_text = _ends(pair.student_bytes, s_body)
    t_shift, s_shift = _leading_space_shift(t_text, s_text)
    t_ends, s_ends = t_ends - t_shift, s_ends - s_shift
    limit = _common_prefix(t_text[t_shift:], s_text[s_shift:])
    out: list[tuple[int, int, bool]] = []
    i = j = i0 = j0 = 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] == t_ends[j]:
            if s_ends[i] > limit:
                return out
            if s_ends[i] > 0 or (i == i0 and j == j0):  # a token spelling nothing joins the next group
                out.append((i0, j0, i == i0 and j == j0))
                i0, j0 = i + 1, j + 1
            i, j = i + 1, j + 1
        elif s_ends[i] < t_ends[j]:
            i += 1
        else:
            j += 1
    whole = len(t_text) - t_shift == len(s_text) - s_shift == limit
    if t_eos and s_eos and whole and i0 == len(s_body) and j0 == len(t_body):
        out.append((len(s_body), len(t_body), True))
    return out


def aligned_topk(teacher_ids: list[int], topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                 student_ids: list[int], pair: TokenizerPair) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k rows ([n_teacher, K] ids and logprobs, row j: its distribution for
    teacher token j) as rows of the student's tokens ([n_student, K]): ids mapped to the
    student's vocabulary (UNMAPPED: no student token spells it, or an unmatched group) and the
    logprobs as they are; NaN logprobs where a student token gets no teacher row."""
    k = topk_ids.shape[1]
    ids = np.full((len(student_ids), k), UNMAPPED, np.int64)
    logprobs = np.full((len(student_ids), k), np.nan, np.float32)
    for s, t, one_to_one in groups(teacher_ids, student_ids, pair):
        if t >= len(topk_ids):
            continue
        logprobs[s] = topk_logprobs[t]
        if one_to_one:
            mapped = pair.to_student[np.clip(topk_ids[t], 0, len(pair.to_student) - 1)]
            _, first = np.unique(mapped, return_index=True)
            keep = np.zeros(k, bool)
            keep[first] = True  # two teacher tokens spelling the same bytes: the first (likelier) one
            ids[s] = np.where(keep & (mapped != UNMAPPED), mapped, UNMAPPED)
    return ids, logprobs
