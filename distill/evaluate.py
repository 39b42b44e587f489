"""evaluate: teacher vs distilled student vs baseline student, on held-out sets, with intervals.

    distill evaluate --config configs/default.yaml

Sets: the `test` split; for the built-in data the `shifted` set (worded from a phrase bank that
shares nothing with training: does the student know the task, or the templates?); and every
`evaluation.extra_sets` file. The models run one at a time in a Ray actor (so latency figures are
not distorted by a neighbour; `distill.eval_worker` says when they share one) with the same vLLM
settings and sampling: all sets in
one batch (throughput), then `latency_requests` prompts one by one (p50/p95 latency) and with one
output token (time to first token). Metrics come from the task module, against the gold
references and against the teacher's answers (agreement), each with a 95% bootstrap interval;
"% of teacher kept" is the student's primary metric over the teacher's, with a paired interval,
and each set gets a sentence saying whether it separates student from teacher at all.
`evaluation.min_kept_ratio` turns a student that keeps too little into a failed command.
Writes `eval/report.json`, `eval/report.md`, `eval/predictions.parquet` and plots.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import RunConfig, SamplingConfig
from distill.errors import DistillError, UserError
from distill.eval_worker import EvalHosts
from distill.rundir import RunDir


class DistillationGateError(DistillError, RuntimeError):
    """The distilled student keeps less of the teacher's quality than `evaluation.min_kept_ratio`."""


def models_to_compare(cfg: RunConfig, rd: RunDir) -> dict[str, str]:
    from distill.prepare import teacher_context
    from distill.model_files import ensure_student_base, resolve_model

    models = {}
    if cfg.teacher.path is not None:
        models["teacher"] = resolve_model(cfg.teacher.path)
    elif cfg.teacher.kind == "endpoint":
        models["teacher"] = cfg.teacher.base_url  # evaluated through the endpoint itself
    if "teacher" in models and teacher_context(cfg.teacher):
        models["teacher_bare"] = models["teacher"]  # the same model on the task's own prompt
    for name, extra in cfg.teachers.items():  # every other teacher beside the student, as it generated
        if extra.path is not None or extra.kind == "endpoint":
            models[f"{EXTRA_PREFIX}{name}"] = resolve_model(extra.path) if extra.path is not None else extra.base_url
    models["student"] = rd.student.uri
    if cfg.evaluation.include_baseline:
        models["baseline"] = ensure_student_base(cfg, rd)
    if cfg.training.gold_control and rd.student_gold.join("config.json").exists():
        models["gold_control"] = rd.student_gold.uri
    return models


EXTRA_PREFIX = "teacher:"  # `teacher:<name>`: one of `teachers`, in the report


def model_config(cfg: RunConfig, name: str) -> tuple[RunConfig, str]:
    """The config a compared model runs under, and its role: another teacher (`teacher:<name>`)
    runs as the only teacher of its own routed config (`distill.teachers`)."""
    if name.startswith(EXTRA_PREFIX):
        from distill.teachers import routed_config

        return routed_config(cfg, name.removeprefix(EXTRA_PREFIX)), "teacher"
    return cfg, name


def eval_sets(cfg: RunConfig, rd: RunDir) -> dict[str, list[dict[str, Any]]]:
    """Name -> prompt rows: `test`, `shifted` (when prepared), `validation` and `shifted_validation`
    (when asked for and prepared) and the user's extra sets."""
    from distill.prepare import read_eval_set

    import pyarrow.dataset as pads

    splits = [*S.EVAL_SPLITS, *(S.CHOICE_SPLITS if cfg.evaluation.validation else ())]
    prompts = pads.dataset(rd.prompts.list_files(".parquet"), filesystem=rd.prompts.fs, format="parquet",
                           schema=S.PROMPT_SCHEMA).to_table(filter=pads.field(S.SPLIT).isin(splits))
    sets = {name: prompts.filter(pc.equal(prompts[S.SPLIT], name)).to_pylist() for name in splits}
    sets = {name: rows for name, rows in sets.items() if rows}
    for extra in cfg.evaluation.extra_sets:
        sets[extra.name] = read_eval_set(extra.path, extra.name, cfg)
    if cfg.evaluation.limit:
        sets = {name: rows[: cfg.evaluation.limit] for name, rows in sets.items()}
    if "test" not in sets:
        raise UserError("the test split is empty: raise data.split.test")
    return sets


def answers_of(cfg: RunConfig, name: str, path: str, rows: list[dict], sampling: SamplingConfig, context,
               hosts: EvalHosts | None = None) -> list[str]:
    """A model's answers to `rows`, in `hosts`' actor (reused for the caller's next model) or in
    an actor of its own, gone when this returns."""
    import ray

    with EvalHosts() if hosts is None else nullcontext(hosts) as used:
        actor = used.host(cfg, name, path)
        return [texts[0] for texts in ray.get(actor.answers.remote(rows, sampling.model_copy(update={"n": 1}),
                                                                   context))]


def evaluate(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    import ray

    from distill.prepare import teacher_context
    from distill.ray_utils import connect
    from distill.report import build_report, write_report
    from distill.tasks import task_from_config

    sets = eval_sets(cfg, rd)
    rows = [r for set_rows in sets.values() for r in set_rows]
    connect(cfg.ray)
    results: dict[str, dict[str, Any]] = {}
    with EvalHosts() as hosts:  # the models share an actor where they can (distill.eval_worker)
        for name, path in models_to_compare(cfg, rd).items():
            mcfg, role = model_config(cfg, name)
            # a teacher as it generated (with its context); `teacher_bare` without it
            with_context = (teacher_context(mcfg.teacher) or None) if role == "teacher" else None
            print(f"[evaluate] {name}: {len(rows)} prompts in {len(sets)} sets "
                  f"({', '.join(f'{s} {len(r)}' for s, r in sets.items())}) ({path})", flush=True)
            if role.startswith("teacher") and mcfg.teacher.kind == "endpoint" and mcfg.teacher.path is None:
                from distill.endpoint import measure_endpoint

                measured = measure_endpoint(mcfg, rows, cfg.evaluation.sampling, cfg.evaluation.latency_requests,
                                            with_context)
            else:
                actor = hosts.host(mcfg, role, path)
                measured = ray.get(actor.run.remote(rows, cfg.evaluation.sampling,
                                                    cfg.evaluation.latency_requests, with_context))
            results[name] = {**measured, "path": path}
    texts = {name: m.pop("texts") for name, m in results.items()}
    table = {S.ID: [r[S.ID] for r in rows], S.SPLIT: [r[S.SPLIT] for r in rows],
             S.REFERENCE: [r[S.REFERENCE] for r in rows], **{f"{n}_text": t for n, t in texts.items()}}
    rd.eval.write_part(pa.table(table), "predictions")
    report = build_report(cfg, rd, task_from_config(cfg.task), sets, texts, results)
    write_report(rd, report)
    print(f"[evaluate] report: {rd.eval.uri}/report.md")
    for line in report["summary"]["verdicts"]:
        print(f"[evaluate] {line}")
    return {"rows": len(rows), "sets": {s: len(r) for s, r in sets.items()}, "summary": report["summary"]}


def check_gate(cfg: RunConfig, stats: dict[str, Any]) -> None:
    """Fail the command when the student keeps less than `evaluation.min_kept_ratio` of the
    teacher's primary metric on any set (checked on every run, also when up to date)."""
    floor = cfg.evaluation.min_kept_ratio
    if floor is None:
        return
    kept = stats["summary"].get("kept", {})
    undefined = [s for s, k in kept.items() if k["value"] is None]
    if undefined:
        print(f"[evaluate] evaluation.min_kept_ratio cannot judge {', '.join(undefined)}: the teacher scores 0 there")
    short = {s: k for s, k in kept.items() if k["value"] is not None and k["value"] < floor}
    if short:
        table = "\n".join(f"  {s}: student keeps {k['value']:.1%} of the teacher's "
                          f"{stats['summary']['primary_metric']} (95% CI {k['ci'][0]:.1%}-{k['ci'][1]:.1%})"
                          for s, k in kept.items() if k["value"] is not None)
        raise DistillationGateError(
            f"the distilled student keeps less than evaluation.min_kept_ratio={floor:.0%} of the teacher "
            f"on {', '.join(short)}:\n{table}\nSee the report ({cfg.run_dir}/eval/report.md); more or better "
            "curated data, more epochs, or a larger student usually help.")
