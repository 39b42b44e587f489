"""Several teachers in one run: each prompt goes to one named teacher, which writes its own rows.

    teacher:  {kind: vllm, path: builtin:smollm2-135m-instruct}      # named "teacher"
    teachers: {api: {kind: endpoint, base_url: ..., model: ...}}     # more, by name
    data: {teacher_field: domain}   # an input row's `domain` names its teacher (none: `teacher`)

`prepare` stores each prompt's teacher in the prompts' `teacher` column (null: the main one).
Every stage that runs a teacher runs each one as the only teacher of a run over its own prompts
(`routed_config` swaps it in), so the single-teacher code is the multi-teacher code: `generate`
writes, reconciles and resumes each teacher's rows in its own folder (`teacher/` for the main
one, `teacher/<name>/` for the others), each folder stamped with its own tokenizer; curation
keeps each part's stamp; training reads it per part (logit KD where the ids are the student's
or align to them, sequence KD where a part is text-only); evaluation shows each teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import RunConfig
from distill.config.teacher_student import PRIMARY_TEACHER
from distill.storage import Location


@dataclass(frozen=True)
class Route:
    """One teacher of a run: its name and the config in which it is the run's only teacher."""

    name: str
    cfg: RunConfig

    @property
    def main(self) -> bool:
        return self.name == PRIMARY_TEACHER


def routed_config(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with teacher `name` as its `teacher` and no others. A derived student made from the
    main teacher stays made from it (`student.of`)."""
    if name == PRIMARY_TEACHER:
        return cfg.model_copy(update={"teachers": {}})
    student = cfg.student
    if student.kind == "derived" and student.of is None:
        student = student.model_copy(update={"of": getattr(cfg.teacher, "path", None)})
    return cfg.model_copy(update={"teacher": cfg.teachers[name], "teachers": {}, "student": student})


def routes(cfg: RunConfig) -> list[Route]:
    """The run's teachers, the main one first."""
    return [Route(PRIMARY_TEACHER, routed_config(cfg, PRIMARY_TEACHER))] + \
        [Route(name, routed_config(cfg, name)) for name in cfg.teachers]


def folder(teacher_root: Location, name: str) -> Location:
    """Where teacher `name` writes its rows: the main teacher in the stage folder itself (as in a
    single-teacher run), the others in a sub-folder."""
    return teacher_root if name == PRIMARY_TEACHER else teacher_root.join(name)


def folders(cfg: RunConfig, teacher_root: Location) -> list[tuple[str, Location]]:
    return [(name, folder(teacher_root, name)) for name in [PRIMARY_TEACHER, *cfg.teachers]]


def routed_mask(table: pa.Table, name: str | None) -> pa.ChunkedArray | None:
    """Rows of a prompts table that go to teacher `name` (None: every row, a single-teacher run)."""
    if name is None:
        return None
    column = table[S.TEACHER]
    if name == PRIMARY_TEACHER:
        return pc.fill_null(pc.equal(column, PRIMARY_TEACHER), True)
    return pc.fill_null(pc.equal(column, name), False)


def routed_filter(name: str | None):
    """`routed_mask` as a pyarrow dataset expression (for scans that filter while they read)."""
    import pyarrow.dataset as pads

    if name is None:
        return None
    column = pads.field(S.TEACHER)
    if name == PRIMARY_TEACHER:
        return column.is_null() | (column == PRIMARY_TEACHER)
    return column == name


def check_name(value, field: str, cfg: RunConfig) -> str | None:
    """An input row's teacher, checked against the run's teachers (None: the main one)."""
    if value is None or value == PRIMARY_TEACHER:
        return None
    if not isinstance(value, str) or value not in cfg.teachers:
        names = ", ".join([PRIMARY_TEACHER, *cfg.teachers])
        raise ValueError(f"`{field}` is {value!r}, which names no teacher of this run ({names}): "
                         "fix the row, or add the teacher under `teachers`")
    return value


def part_name(index: int, name: str) -> str:
    """A curated part's name: `part-000003`, with `.NAME` after it for another teacher's rows, so
    that training can mix the teachers' rows without opening a file (`interleaved_groups`)."""
    return f"part-{index:06d}" + ("" if name == PRIMARY_TEACHER else f".{name}")


def interleaved_groups(files: list[str]) -> list[list[str]]:
    """Files read together, so that each read task holds every teacher's rows: the j-th part of
    each teacher in group j (`part_name` says whose a part is). A one-teacher run's files come
    one per group, in order. Training read one teacher's parts after the other's, so its
    length-bucketing buffers held one teacher each, which cost the student (bench/README.md,
    "Several teachers on real engines")."""
    by_teacher: dict[str, list[str]] = {}
    for path in files:
        stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        by_teacher.setdefault(stem.partition(".")[2], []).append(path)
    lists = list(by_teacher.values())
    return [[f[j] for f in lists if j < len(f)] for j in range(max(map(len, lists), default=0))]

