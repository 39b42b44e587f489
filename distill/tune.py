"""tune: choose how the teacher is asked (prompt, context, sampling) on the validation split only.

    distill tune -c configs/default.yaml --candidates configs/tune/sentiment.yaml
    distill tune -c C --candidates T --write configs/mine.yaml     # the config with the choice in it

A candidates file names sets of overrides of the keys that shape what the teacher answers:
`task.system_prompt` (the prompt the student also sees), `teacher.system_prompt` and
`teacher.few_shot` (the teacher's own context), `generation.sampling.*`. The teacher answers the
validation split's prompts (written by `prepare`) once per candidate, in one engine, as it would
in `generate`: with that candidate's context and sampling, and with `n > 1` samples the majority
answer counts (what `curation.select: majority` keeps). Each candidate is scored with the task's
primary metric against the references; when the validation prompts have none, by the teacher's
self-agreement (the majority answer's mean share of the samples; it needs n > 1). The best
candidate wins, the first listed on a tie: list the simplest first. Every score goes to
`tune.json` in the run directory; the test split and the extra sets are never read, so the
figures they report stay honest. Choices that need a training run per candidate (methods,
epochs) are compared by `bench/compare_methods.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill import schema as S
from distill.config import ConfigError, RunConfig, dump_config
from distill.config.loading import apply_overrides, read_yaml
from distill.errors import UserError
from distill.rundir import RunDir

TUNABLE = ("task.system_prompt", "teacher.system_prompt", "teacher.few_shot", "generation.sampling")


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, Any]
    cfg: RunConfig


def read_candidates(path: str, cfg: RunConfig) -> list[Candidate]:
    """The named candidates of a YAML file `{candidates: {NAME: {dotted.key: value}}}`, each
    validated against `cfg` with its overrides applied."""
    raw = read_yaml(path, "candidates file")
    named = raw.get("candidates") if isinstance(raw, dict) else None
    if not isinstance(named, dict) or not named:
        raise ConfigError(f"{path}: needs `candidates:`, a mapping of names to overrides "
                          "(e.g. `bare: {}` and `one-word: {task.system_prompt: \"Answer with one word.\"}`)")
    if cfg.teacher.kind == "precomputed" or getattr(cfg.teacher, "path", None) is None:
        raise ConfigError("distill tune needs a teacher model to ask (teacher.kind: vllm, or teacher.path "
                          "for an endpoint teacher)")
    out = []
    for name, overrides in named.items():
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: candidate {name!r} must map dotted keys to values, got {overrides!r}")
        for key in overrides:
            if not any(key == k or key.startswith(k + ".") for k in TUNABLE):
                raise ConfigError(f"{path}: candidate {name!r} sets {key}, which does not shape the teacher's "
                                  f"answers; tune accepts {', '.join(TUNABLE)}")
        out.append(Candidate(str(name), overrides, apply_overrides(cfg, overrides, f"{path} candidate {name!r}")))
    return out


def validation_rows(rd: RunDir, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    files = rd.prompts.list_files(".parquet")
    if not files:
        raise UserError(f"no prompts in {rd.prompts.uri}: run `distill prepare` first")
    scan = pads.dataset(files, filesystem=rd.prompts.fs, format="parquet", schema=S.PROMPT_SCHEMA)
    rows = scan.to_table(filter=pads.field(S.SPLIT) == "validation").to_pylist()[:limit]
    if not rows:
        raise UserError("the validation split is empty: raise data.split.validation (choices are made there)")
    return rows


def with_task_prompt(row: dict[str, Any], system_prompt: str) -> dict[str, Any]:
    """The row as `prepare` would have written it under another task system prompt."""
    turns = [m for m in row[S.MESSAGES] if m["role"] != "system"]
    return {**row, S.MESSAGES: ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns}


def score_candidate(task, samples: list[list[str]], references: list[str] | None) -> dict[str, Any]:
    """A candidate's figures from each prompt's sampled answers: the majority answer's score
    (with references), its self-agreement, and the share of answers the task can read."""
    from distill.curate_rules import majority

    voted, shares, read = [], [], 0
    for texts in samples:
        answers = [task.extract(t) for t in texts]
        winner, top = majority(answers)
        read += sum(a is not None for a in answers)
        voted.append(next((t for t, a in zip(texts, answers) if a == winner), "") if winner is not None else "")
        shares.append(top / len(texts) if winner is not None else 0.0)
    figures = {"self_agreement": round(sum(shares) / len(shares), 4),
               "parsed": round(read / sum(len(t) for t in samples), 4)}
    if references is not None:
        figures[task.primary] = round(task.score(voted, references)[task.primary], 4)
    return figures


def tune(cfg: RunConfig, rd: RunDir, candidates_path: str, limit: int | None = None,
         write: str | None = None) -> dict[str, Any]:
    import ray

    from distill.prepare import teacher_context
    from distill.eval_worker import EvalHosts
    from distill.model_files import resolve_model
    from distill.ray_utils import connect
    from distill.tasks import task_from_config

    candidates = read_candidates(candidates_path, cfg)
    rows = validation_rows(rd, limit)
    with_refs = [r for r in rows if r.get(S.REFERENCE) is not None]
    rows = with_refs or rows
    references = [r[S.REFERENCE] for r in rows] if with_refs else None
    if references is None:
        single = [c.name for c in candidates if c.cfg.generation.sampling.n < 2]
        if single:
            raise UserError(f"the validation prompts have no references, so candidates are scored by the "
                             f"teacher's self-agreement, which needs generation.sampling.n > 1; {single} sample once")
    task = task_from_config(cfg.task)
    metric = task.primary if references is not None else "self_agreement"
    print(f"[tune] {len(candidates)} candidates on {len(rows)} validation prompts, by {metric}", flush=True)
    connect(cfg.ray)
    results = []
    with EvalHosts() as hosts:
        actor = hosts.host(cfg, "teacher", resolve_model(cfg.teacher.path))
        for cand in candidates:
            prompt = task_from_config(cand.cfg.task).system_prompt()
            asked = [with_task_prompt(r, prompt) for r in rows]
            sampling = cand.cfg.generation.sampling
            samples = ray.get(actor.answers.remote(asked, sampling, teacher_context(cand.cfg.teacher)))
            figures = score_candidate(task, samples, references)
            results.append({"name": cand.name, "overrides": cand.overrides, **figures})
            print(f"[tune] {cand.name}: {metric} {figures[metric]:.3f} (parsed {figures['parsed']:.3f}, "
                  f"n={sampling.n}, temperature {sampling.temperature})", flush=True)
    best = max(range(len(results)), key=lambda i: (results[i][metric], -i))
    chosen = candidates[best]
    summary = {"split": "validation", "prompts": len(rows), "metric": metric, "candidates": results,
               "chosen": chosen.name, "overrides": chosen.overrides}
    rd.root.join("tune.json").write_json(summary)
    print(f"[tune] chosen: {chosen.name} ({metric} {results[best][metric]:.3f}); "
          f"all scores in {rd.root.join('tune.json').uri}", flush=True)
    if write:
        with open(write, "w") as f:
            f.write(f"# distill tune chose candidate {chosen.name!r} of {candidates_path} on the validation split\n")
            f.write(dump_config(chosen.cfg))
        print(f"[tune] the config with the choice applied: {write}")
    return summary
