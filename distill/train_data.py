"""Training examples from curated teacher outputs: token ids, response-only labels, aligned top-k.

Pure (no Ray). `examples_table` turns a batch of curated rows into examples as Arrow columns;
`distill.train` runs it as a Ray Data `map_batches` step (`tokenize_split`) between the
curated Parquet and the workers' shards, so no process holds the whole set and the top-k stays
flat Arrow arrays (no Python lists of floats). `collate` pads a micro-batch into a `Batch`, whose
`teacher` field carries the teacher's top-k (a `TeacherTopK`) from here to the loss;
`length_buckets` groups a buffer of examples by length so padding does not dominate.

Alignment: for an example of prompt P and response R, `input_ids = P + R`, `labels` is IGNORE on
P and R on R; teacher top-k rows belong to the response positions, in the same order as labels
(`topk_*[j]` is the teacher's distribution for response token j). The trainer shifts logits by
one so position t predicts token t+1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.chat import prompt_token_ids, split_instruction
from distill.losses import IGNORE
from distill.token_alignment import TokenizerPair, aligned_topk

INPUT_IDS, LABELS, KD_IDS, KD_LOGPROBS, LENGTH = "input_ids", "labels", "kd_ids", "kd_logprobs", "length"
ENDED = ("stop", "trimmed", "relabelled")  # responses that end where the teacher stopped: the student learns EOS


EXAMPLE_SCHEMA = pa.schema([(INPUT_IDS, pa.list_(pa.int32())), (LABELS, pa.list_(pa.int32())),
                            (LENGTH, pa.int32()), (KD_IDS, pa.list_(pa.int32())),
                            (KD_LOGPROBS, pa.list_(pa.float32()))])


def _flat_list(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets from 0, values, valid) of a list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets, np.int64)
    return offsets - offsets[0], arr.flatten().to_numpy(zero_copy_only=False), np.asarray(arr.is_valid())


def _teacher_rows(teacher, i: int, response: list[int], teacher_ids: list[int], top_k: int,
                  align: TokenizerPair | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Row i's top-k for its (truncated) response positions, flat [len(response) * K] ids and
    logprobs, or None without one. `teacher`: the flat top-k columns (offsets, ids, valid,
    logprobs); with `align`, rows in another tokenizer's ids moved onto the response's tokens."""
    offsets, id_values, valid, lp_values = teacher
    lo, hi = offsets[i], offsets[i + 1]
    if not valid[i] or hi <= lo:
        return None
    n = len(response)
    if align is not None:
        ids, lps = aligned_topk(teacher_ids, id_values[lo:hi].reshape(-1, top_k), lp_values[lo:hi].reshape(-1, top_k),
                                response, align)
        return ids.reshape(-1).astype(np.int32), lps.reshape(-1)
    take = min((hi - lo) // top_k, n) * top_k
    pad = n * top_k - take  # the appended EOS has no teacher row: masked out of KD
    return (np.concatenate([id_values[lo:lo + take], np.zeros(pad, np.int32)]),
            np.concatenate([lp_values[lo:lo + take].astype(np.float32), np.full(pad, np.nan, np.float32)]))


def instruction_moved(messages: list[dict[str, str]], row_id: str, chance: float, seed: int) -> list[dict[str, str]]:
    """The messages as the student reads them (`training.move_instruction`): with `chance`, drawn
    per row id and seed, the last message's instruction at the other end of its text."""
    if not chance or random.Random(f"{seed}:{row_id}:move").random() >= chance:
        return messages
    *context, last = messages
    asked = split_instruction(last["content"])
    return [*context, {**last, "content": asked.asking(asked.text, moved=True)}]


def examples_table(table: pa.Table, tokenizer, max_seq_len: int, use_teacher_ids: bool, top_k: int,
                   align: TokenizerPair | None = None, move_instruction: float = 0.0, seed: int = 0) -> pa.Table:
    """Curated rows -> training examples (EXAMPLE_SCHEMA), truncated to max_seq_len; a row whose
    prompt alone fills max_seq_len is left out (nothing to learn).

    With `use_teacher_ids` (same tokenizer) the teacher's own token ids are the targets, so
    its top-k rows line up; otherwise the response text is re-tokenised, and the top-k comes
    along only through `align` (another tokenizer's rows moved onto the student's tokens,
    `distill.token_alignment`). The top-k is sliced as numpy views of the Arrow buffers: response
    position j of an example has the teacher's row j, and positions without one (an appended
    EOS) are NaN. `move_instruction`, `seed`: `instruction_moved`."""
    eos = tokenizer.eos_token_id
    names = table.column_names
    messages, texts = table[S.MESSAGES].to_pylist(), table[S.TEXT].to_pylist()
    if move_instruction:
        messages = [instruction_moved(m, i, move_instruction, seed) for m, i in zip(messages, table[S.ID].to_pylist())]
    finish = table[S.FINISH_REASON].to_pylist()
    token_ids = table[S.TOKEN_IDS].to_pylist() if S.TOKEN_IDS in names else [None] * len(table)
    with_kd = bool(top_k and (use_teacher_ids or align) and S.TOPK_IDS in names)
    if with_kd:
        offsets, id_values, valid = _flat_list(table[S.TOPK_IDS])
        teacher = (offsets, id_values, valid, _flat_list(table[S.TOPK_LOGPROBS])[1])
    inputs, labels, lengths, kd_ids, kd_lps, kd_offsets, kd_present = [], [], [], [], [], [0], []
    for i, msgs in enumerate(messages):
        prompt = prompt_token_ids(tokenizer, msgs)
        if use_teacher_ids and token_ids[i]:
            response = list(token_ids[i])
        else:
            response = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if finish[i] in ENDED and (not response or response[-1] != eos):
            response = response + [eos]  # teach the student to stop where the teacher stopped
        ids = (prompt + response)[:max_seq_len]
        n_resp = max(0, len(ids) - len(prompt))
        if n_resp == 0:
            continue  # the prompt alone fills max_seq_len: nothing to learn
        inputs.append(ids)
        labels.append([IGNORE] * len(prompt) + response[:n_resp])
        lengths.append(len(ids))
        rows = _teacher_rows(teacher, i, response[:n_resp], list(token_ids[i] or []), top_k, align) if with_kd else None
        kd_present.append(rows is not None)
        if rows is not None:
            kd_ids.append(rows[0])
            kd_lps.append(rows[1])
        kd_offsets.append(kd_offsets[-1] + (n_resp * top_k if rows is not None else 0))
    mask = pa.array(~np.asarray(kd_present, bool))
    flat_ids = np.concatenate([np.zeros(0, np.int32), *kd_ids]).astype(np.int32)
    flat_lps = np.concatenate([np.zeros(0, np.float32), *kd_lps])
    offsets = pa.array(np.asarray(kd_offsets, np.int32))
    return pa.Table.from_arrays([
        pa.array(inputs, pa.list_(pa.int32())), pa.array(labels, pa.list_(pa.int32())),
        pa.array(lengths, pa.int32()),
        pa.ListArray.from_arrays(offsets, pa.array(flat_ids, pa.int32()), mask=mask),
        pa.ListArray.from_arrays(offsets, pa.array(flat_lps, pa.float32()), mask=mask),
    ], schema=EXAMPLE_SCHEMA)


def kd_coverage(examples: pa.Table, top_k: int) -> dict[str, int]:
    """Of the response tokens of some examples: how many have a teacher row (`with_teacher`), and
    of those how many share no token with the student's vocabulary there (`sorted_only`,
    compared by sorted probabilities): what cross-tokenizer KD can use of the teacher."""
    from distill.losses import UNMAPPED

    ids = np.asarray(examples[KD_IDS].combine_chunks().flatten(), np.int64).reshape(-1, top_k)
    logprobs = np.asarray(examples[KD_LOGPROBS].combine_chunks().flatten(), np.float32).reshape(-1, top_k)
    defined = ~np.isnan(logprobs[:, 0])
    labels = examples[LABELS].combine_chunks().flatten().to_numpy()
    return {"response_tokens": int((labels != IGNORE).sum()), "with_teacher": int(defined.sum()),
            "sorted_only": int((defined & (ids == UNMAPPED).all(-1)).sum())}


def gold_table(prompts: pa.Table) -> pa.Table:
    """Prompt rows as 'teacher outputs' whose text is the gold reference: the no-teacher control."""
    with_reference = prompts.filter(pc.is_valid(prompts[S.REFERENCE]))
    return with_reference.append_column(S.TEXT, with_reference[S.REFERENCE]).append_column(
        S.FINISH_REASON, pa.array(["stop"] * len(with_reference), pa.string()))


def read_files(batch: pa.Table, groups: list[list[str]], filesystem, then, **kwargs) -> pa.Table:
    """Ray Data UDF over a `range` of group indices: read each group's Parquet files, pass each
    to `then`, and interleave what comes back (`interleave`: a group holds several teachers' parts).

    Why not `ray.data.read_parquet(files)`: with `preserve_order` (the same seed, the same
    batches) its first batch came after a time that grew with the number of files, so the first
    training step waited for the whole set (bench/README.md, "The data path at scale"); indices
    read a group per task and the first batch comes as soon as its files are read."""
    import pyarrow.parquet as pq

    tables = [then(pq.read_table(path, filesystem=filesystem), **kwargs)
              for i in batch["id"].to_pylist() for path in groups[i]]
    return interleave(tables)


def interleave(tables: list[pa.Table]) -> pa.Table:
    """The tables' rows mixed evenly, each table's in its own order: row r of a table of n rows
    goes at (r + 0.5) / n of the way (ties by table order). One table comes back as it is."""
    if len(tables) == 1:
        return tables[0]
    at = np.concatenate([(np.arange(len(t)) + 0.5) / max(1, len(t)) for t in tables])
    whole = pa.concat_tables(tables, promote_options="default")
    return whole.take(pa.array(np.argsort(at, kind="stable")))


_TOKENIZERS: dict[str, Any] = {}  # per worker process: Ray Data reuses processes between tasks


def tokenizer_for(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from distill.model_files import resolve_model

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(resolve_model(path))
    return _TOKENIZERS[path]


_PAIRS: dict[tuple[str, str], TokenizerPair] = {}


def pair_for(teacher_path: str, student_path: str) -> TokenizerPair:
    """The alignment tables of two tokenizers, made once per worker process."""
    if (teacher_path, student_path) not in _PAIRS:
        _PAIRS[teacher_path, student_path] = TokenizerPair.of(tokenizer_for(teacher_path), tokenizer_for(student_path))
    return _PAIRS[teacher_path, student_path]


_FINGERPRINTS: dict[str, str] = {}


def student_fingerprint(path: str) -> str:
    if path not in _FINGERPRINTS:
        from distill.tokenizers import fingerprint

        _FINGERPRINTS[path] = fingerprint(tokenizer_for(path))
    return _FINGERPRINTS[path]


def tokenize_split(batch: pa.Table, student_path: str, split: str, max_seq_len: int, use_teacher_ids: bool,
                   top_k: int, gold: bool = False, align_from: str | None = None,
                   move_instruction: float = 0.0, seed: int = 0) -> pa.Table:
    """Ray Data UDF (tasks, not actors: nothing holds a CPU between batches): a batch of curated
    rows (or, `gold`, of prompts) -> the examples of one split. `use_teacher_ids` and
    `align_from` (the teacher tokenizer the top-k is in, when it is not the student's:
    cross-tokenizer logit KD) are the run's; a batch read from a stamped part decides them from
    its own stamp, so each teacher's rows of a run with several use their own signal.
    `move_instruction` applies to the train split only (`examples_table`)."""
    from distill.tokenizers import TokenizerStamp
    from distill.topk_codec import expanded_table

    stamp = None if gold else TokenizerStamp.of_table(batch.schema)
    if stamp is not None:
        use_teacher_ids = stamp.fingerprint == student_fingerprint(student_path)
        align_from = stamp.name if top_k and not use_teacher_ids else None
    batch = batch.filter(pc.equal(batch[S.SPLIT], split))
    batch = gold_table(batch) if gold else expanded_table(batch)
    align = pair_for(align_from, student_path) if align_from and top_k else None
    return examples_table(batch, tokenizer_for(student_path), max_seq_len, use_teacher_ids, top_k, align,
                          move_instruction if split == "train" else 0.0, seed)


def length_buckets(examples: list[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict]]:
    """Micro-batches of similar length from a buffer of examples, in a seeded random order.

    The whole buffer is sorted (ties broken by token ids), so batch-mates are near-copies of one
    template and the same every epoch; only their order depends on the seed. The usual
    alternative, random windows of batches sorted by length (transformers' LengthGroupedSampler:
    random batch-mates), trained worse students on every set over three training seeds, so the
    sort stays (bench/README.md, "Distillation methods").
    """
    order = sorted(range(len(examples)), key=lambda i: (examples[i][LENGTH], examples[i][INPUT_IDS]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    for b in batches:
        yield [examples[i] for i in b]


BUFFER_BATCHES = 32  # micro-batches per length-bucketing buffer


def bucketed_batches(shard, batch_size: int, seed: int) -> Iterator[list[dict]]:
    """Micro-batches from a Ray Train dataset shard, `length_buckets` over buffers of
    `BUFFER_BATCHES` batches (memory stays one buffer, whatever the data's size)."""
    for i, buf in enumerate(shard.iter_batches(batch_size=batch_size * BUFFER_BATCHES, batch_format="pandas")):
        yield from length_buckets(buf.to_dict("records"), batch_size, seed + i)


@dataclass
class TeacherTopK:
    """The teacher's stored top-k at every position of a batch, aligned to `Batch.labels`:
    ids [B, L, K] (long) and logprobs [B, L, K] (NaN where the teacher has no row: prompt,
    padding, an appended EOS)."""

    ids: Any
    logprobs: Any

    def shifted(self) -> "TeacherTopK":
        """Aligned to `labels[:, 1:]`, as the logits that predict them."""
        return TeacherTopK(self.ids[:, 1:], self.logprobs[:, 1:])

    def defined(self):
        """[B, L] bool: positions where the teacher's distribution is known."""
        import torch

        return ~torch.isnan(self.logprobs[..., 0])

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device))


@dataclass
class Batch:
    input_ids: Any  # [B, L] long
    attention_mask: Any  # [B, L] long
    labels: Any  # [B, L] long, IGNORE outside the response
    teacher: TeacherTopK | None = None  # None: sequence-level KD


def _carries_kd(example: dict[str, Any]) -> bool:
    """Whether an example has teacher rows (a row without them is None, or NaN out of pandas)."""
    return isinstance(example.get(KD_IDS), (list, np.ndarray))


def collate(batch: list[dict[str, Any]], pad_id: int, top_k: int) -> Batch:
    """Pad a micro-batch. The teacher's top-k comes along when an example carries it (positions
    without a teacher row, e.g. every position of a response relabelled at its first token, are
    NaN and take no KD loss)."""
    import torch

    L = max(len(e[INPUT_IDS]) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    has_kd = top_k > 0 and any(_carries_kd(e) for e in batch)
    kd_ids = torch.zeros((B, L, top_k), dtype=torch.long) if has_kd else None
    kd_vals = torch.full((B, L, top_k), float("nan")) if has_kd else None
    for b, e in enumerate(batch):
        n = len(e[INPUT_IDS])
        input_ids[b, :n] = torch.tensor(e[INPUT_IDS])
        labels[b, :n] = torch.tensor(e[LABELS])
        attention[b, :n] = 1
        if has_kd and _carries_kd(e):
            n_resp = sum(1 for x in e[LABELS] if x != IGNORE)
            kd_ids[b, n - n_resp:n] = torch.tensor(e[KD_IDS]).view(-1, top_k)
            kd_vals[b, n - n_resp:n] = torch.tensor(e[KD_LOGPROBS], dtype=torch.float32).view(-1, top_k)
    return Batch(input_ids, attention, labels, TeacherTopK(kd_ids, kd_vals) if has_kd else None)
