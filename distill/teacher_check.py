"""The teacher is checked before the expensive part: is it better than the student it will teach?

    distill generate -c configs/default.yaml                 # runs it first, when there is work
    distill generate -c C evaluation.teacher_check=null      # skip it

Before `generate` sends the first prompt to the teacher, the teacher (with its context, with the
generation's sampling: as it will generate) and the student before distillation answer a few
labelled prompts: the validation split's prompts that have references, or
`evaluation.teacher_check.set` (a JSONL/Parquet file of prompts with references). Both are scored
with the task's primary metric, the figures are printed and kept in the stage's stats, and the
stage stops when the teacher is not ahead of the student by `min_margin`: generating a whole
prompt set with a teacher the student can already match buys nothing. Prompts without any
reference anywhere skip the check and say so (there is nothing to score against). The check
runs for a vLLM teacher on a fresh `generate` (not when resuming one); an endpoint teacher is
not checked yet.
"""

from __future__ import annotations

from typing import Any

from distill import schema as S
from distill.config import RunConfig
from distill.errors import DistillError
from distill.rundir import RunDir


class TeacherCheckError(DistillError, RuntimeError):
    """The teacher is not better than the student it would teach, by the configured margin."""


def check_rows(cfg: RunConfig, rd: RunDir) -> list[dict[str, Any]]:
    """The labelled prompts the check uses (at most `teacher_check.prompts`)."""
    import pyarrow.dataset as pads

    check = cfg.evaluation.teacher_check
    if check.set is not None:
        from distill.prepare import read_eval_set

        return read_eval_set(check.set, "teacher_check", cfg)[: check.prompts]
    scan = pads.dataset(rd.prompts.list_files(".parquet"), filesystem=rd.prompts.fs, format="parquet",
                        schema=S.PROMPT_SCHEMA)
    table = scan.head(check.prompts, filter=(pads.field(S.SPLIT) == "validation") & pads.field(S.REFERENCE).is_valid())
    return table.to_pylist()


def check_teacher(cfg: RunConfig, rd: RunDir) -> dict[str, Any] | None:
    """Measure teacher and untrained student on the check prompts; raise TeacherCheckError when
    the teacher is not ahead by the margin. Returns the figures (None: no labelled prompts)."""
    from distill.prepare import teacher_context
    from distill.eval_worker import EvalHosts
    from distill.evaluate import answers_of
    from distill.model_files import ensure_student_base, resolve_model
    from distill.ray_utils import connect
    from distill.tasks import task_from_config

    check = cfg.evaluation.teacher_check
    rows = check_rows(cfg, rd)
    if not rows:
        print("[generate] teacher check skipped: no validation prompt has a reference "
              "(give evaluation.teacher_check.set a small labelled file to have one)")
        return None
    connect(cfg.ray)
    task = task_from_config(cfg.task)
    refs = [r[S.REFERENCE] for r in rows]
    with EvalHosts() as hosts:  # one actor for both where they can share it
        teacher = answers_of(cfg, "teacher", resolve_model(cfg.teacher.path), rows, cfg.generation.sampling,
                             teacher_context(cfg.teacher), hosts)
        student = answers_of(cfg, "student", ensure_student_base(cfg, rd), rows, cfg.evaluation.sampling, None,
                             hosts)
    scores = {name: task.score(texts, refs)[task.primary] for name, texts in (("teacher", teacher), ("student", student))}
    figures = {"prompts": len(rows), "metric": task.primary, **{k: round(v, 4) for k, v in scores.items()},
               "margin": round(scores["teacher"] - scores["student"], 4), "min_margin": check.min_margin}
    line = (f"teacher check on {len(rows)} labelled prompts: teacher {task.primary} {scores['teacher']:.3f}, "
            f"student before distillation {scores['student']:.3f} (margin {figures['margin']:+.3f}, "
            f"needed {check.min_margin:+.3f})")
    print(f"[generate] {line}", flush=True)
    if figures["margin"] < check.min_margin:
        raise TeacherCheckError(
            f"{line}: the teacher is not better than the student it would teach, so its answers would "
            "teach little. Give the teacher a context (teacher.system_prompt, teacher.few_shot), a "
            "larger teacher, or a smaller student; or lower evaluation.teacher_check.min_margin, or set "
            "evaluation.teacher_check=null to generate anyway.")
    return figures
