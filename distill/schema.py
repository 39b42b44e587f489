"""Column names and Parquet schemas between stages: the data contract lives here and only here.

prompts/  one row per prompt   (prepare -> generate, evaluate)
teacher/  one row per sample   (generate -> curate)
curated/  one row per kept sample (curate -> train)

Token-level teacher signal is stored flat and compact: for a response of T tokens and top-k
width K, `topk_ids` is int32[T*K] and `topk_logprobs` float16[T*K] (row-major: position, then
rank 1..K, sorted by descending logprob); with `generation.logprob_dtype: q8` the ids are sorted
by id and delta-coded and the logprobs are uint8 codes (`distill/topk_codec.py`). Flat lists keep `iter_torch_batches` and Arrow happy
(ragged nested lists do not convert), and zstd compresses them well.
"""

from __future__ import annotations

import pyarrow as pa

# prompts
ID = "id"
SPLIT = "split"
TASK = "task"
MESSAGES = "messages"
REFERENCE = "reference"
TEACHER = "teacher"  # the named teacher a prompt goes to (null: the main one); in teacher rows: who wrote it

# teacher outputs
SAMPLE = "sample"  # index among the n samples for one prompt
TEXT = "text"
TOKEN_IDS = "token_ids"
PROMPT_TOKENS = "prompt_tokens"
OUTPUT_TOKENS = "output_tokens"
FINISH_REASON = "finish_reason"
ERROR = "error"
TOPK = "topk"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
SAMPLED_LOGPROBS = "sampled_logprobs"

SPLITS = ("train", "validation", "test")  # what a user's row may name
SHIFTED = "shifted"  # the built-in data's test set of unseen wording (distill.builtin_data)
SHIFTED_VALIDATION = "shifted_validation"  # other unseen wording, to choose on (evaluation.validation)
EVAL_SPLITS = ("test", SHIFTED)  # evaluated, never generated or trained on
CHOICE_SPLITS = ("validation", SHIFTED_VALIDATION)  # evaluated with evaluation.validation, to choose on
TRAINED_SPLITS = ("train", "validation")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPT_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (SPLIT, pa.string()),
        (TASK, pa.string()),
        (MESSAGES, pa.list_(MESSAGE_TYPE)),
        (REFERENCE, pa.string()),
        (TEACHER, pa.string()),
    ]
)


def teacher_schema(logprob_dtype: str = "float16") -> pa.Schema:
    """`q8`: uint8 codes and id-sorted id deltas (distill.topk_codec)."""
    value = {"float16": pa.float16(), "float32": pa.float32(), "q8": pa.uint8()}[logprob_dtype]
    return pa.schema(
        list(PROMPT_SCHEMA)
        + [
            (SAMPLE, pa.int32()),
            (TEXT, pa.string()),
            (TOKEN_IDS, pa.list_(pa.int32())),
            (PROMPT_TOKENS, pa.int32()),
            (OUTPUT_TOKENS, pa.int32()),
            (FINISH_REASON, pa.string()),
            (ERROR, pa.string()),
            (TOPK, pa.int32()),
            (TOPK_IDS, pa.list_(pa.int32())),
            (TOPK_LOGPROBS, pa.list_(value)),
            (SAMPLED_LOGPROBS, pa.list_(value)),
        ]
    )


TEACHER_SCHEMA = teacher_schema()

# curate adds nothing to a row; it only keeps or drops it
CURATED_SCHEMA = TEACHER_SCHEMA
DROP_REASON = "reason"

PARQUET_OPTIONS = {"compression": "zstd"}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder and cast `table` to `schema`, adding absent nullable columns as nulls."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(len(table), field.type))
    return pa.Table.from_arrays(cols, schema=schema)
