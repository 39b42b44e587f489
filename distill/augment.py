"""Reworded copies of the train prompts, so the student reads more wording than the prompts hold.

    distill run -c my.yaml data.augment.copies=3       # configs/default.yaml has it on

A student trained on a few hundred prompts learns their words; on wording it never saw (the
`shifted` sets) it falls back to the answer it gives most. Each copy of a train prompt replaces
about `data.augment.replace` of the user's one-token content words by one of the word's nearest
neighbours in the student's input embeddings ("terrible" -> "dreadful", "horrific", and at
times "terrific"), as TinyBERT's task-specific augmentation does. No label is read or kept: a
copy has no reference, and the teacher answers it as it answers any prompt, so a replacement that
turns a review around is labelled by the teacher's reading of the new text. Validation, test and
the shifted sets are never copied. The task's label words are never replaced ("positive or
negative" stays in the question), and neither is the instruction of a message of several lines
(`distill.chat.split_instruction`: "Is this review positive or negative?" on the first line or,
after a blank line, on the last).

The embeddings are the student's (for a derived student, the teacher's own), so this works with
any teacher, an API teacher included; they are read once, on the process that prepares.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distill import schema as S
from distill.chat import split_instruction
from distill.config import AugmentConfig

WORD_START = ("Ġ", "▁")  # a token that begins a word after a space: byte-level BPE, SentencePiece
# function words carry the sentence, not its wording: neither replaced nor drawn
FUNCTION_WORDS = frozenset("""
a about after again all also an and any are as at be been before but by can could did do does each
every for from had has have her here his how i in into is it its just may me might my no not of on
once one or our over should so some than that the their them then there these they this those to
too two under us very was we were what when where which who why will with would you your
""".split())


COPY_MARK = "#reword"  # a copy's id: its prompt's id, the mark and the copy's number


def is_copy(row_id: str) -> bool:
    return COPY_MARK in row_id


class WordNeighbours:
    """A tokenizer's whole-word tokens and their nearest neighbours by cosine similarity of the
    model's input embeddings, computed per word when first asked for (a vocabulary-square table
    would take gigabytes)."""

    def __init__(self, tokenizer, embeddings, top: int, protected: Iterable[str] = ()):
        import torch

        self.tok, self.top = tokenizer, top
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.words = {t: p[1:] for t, p in enumerate(pieces)
                      if t < embeddings.shape[0] and p.startswith(WORD_START) and p[1:].isalpha()
                      and p[1:].islower() and len(p) > 3 and p[1:] not in FUNCTION_WORDS}
        keep = {w.lower() for w in protected}
        self.replaceable = {t for t, w in self.words.items() if w not in keep}
        self.ids = sorted(self.words)
        self.unit = torch.nn.functional.normalize(embeddings[self.ids].float(), dim=-1)
        self.row = {t: i for i, t in enumerate(self.ids)}
        self._near: dict[int, list[int]] = {}

    def near(self, token: int) -> list[int]:
        """The `top` words nearest to `token`, without other forms of it ("broke", "breaking"),
        function words or protected words; empty for a token that is not a replaceable word."""
        if token not in self.replaceable:
            return []
        if token not in self._near:
            word = self.words[token]
            sims = self.unit @ self.unit[self.row[token]]
            ranked = (self.ids[j] for j in sims.topk(min(4 * self.top + 1, len(self.ids))).indices.tolist())
            self._near[token] = [t for t in ranked if t != token and t in self.replaceable
                                 and self.words[t][:4] != word[:4]][:self.top]
        return self._near[token]

    def reword(self, text: str, replace: float, rng: random.Random) -> str:
        """`text` with each whole one-token word replaced by a neighbour with chance `replace`."""
        ids = self.tok.encode(" " + text, add_special_tokens=False)  # the first word starts like any other
        pieces = self.tok.convert_ids_to_tokens(ids)
        out = list(ids)
        for i, t in enumerate(ids):
            nxt = pieces[i + 1] if i + 1 < len(ids) else ""
            ends_word = not nxt or nxt.startswith(WORD_START) or not nxt[0].isalpha()
            if ends_word and (near := self.near(t)) and rng.random() < replace:
                out[i] = rng.choice(near)
        # the space put in front comes back from byte-level BPE, not from SentencePiece
        return text if out == ids else self.tok.decode(out).removeprefix(" ")


def load_neighbours(model_dir: str, cfg: AugmentConfig, labels: Iterable[str]) -> WordNeighbours:
    """The neighbours in `model_dir`'s input embeddings (read from its safetensors files alone)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            name = next((k for k in st.keys() if k.endswith("embed_tokens.weight")), None)
            if name:
                return WordNeighbours(AutoTokenizer.from_pretrained(model_dir), st.get_tensor(name),
                                      cfg.neighbours, labels)
    raise FileNotFoundError(f"data.augment: no input embeddings (embed_tokens.weight) in {model_dir}")


def with_copies(rows: Iterable[dict[str, Any]], cfg: AugmentConfig,
                neighbours: WordNeighbours) -> Iterator[dict[str, Any]]:
    """The rows as they come, each train row followed by its reworded copies (streamed: a row's
    copies depend on its id and `cfg.seed` alone, not on the rows before it)."""
    for row in rows:
        yield row
        if row[S.SPLIT] != "train":
            continue
        rng = random.Random(f"{cfg.seed}:{row[S.ID]}")
        *context, last = row[S.MESSAGES]
        asked = split_instruction(last["content"])
        for c in range(cfg.copies):
            text = neighbours.reword(asked.text, cfg.replace, rng)
            if text != asked.text:
                yield {**row, S.ID: f"{row[S.ID]}{COPY_MARK}{c}", S.REFERENCE: None,
                       S.MESSAGES: [*context, {**last, "content": asked.asking(text)}]}
