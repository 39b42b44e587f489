"""The teacher writes new prompts: a user with 50 examples grows them to thousands.

    distill data synth --by-teacher -c configs/default.yaml --out data/written.jsonl [--n 500]

1. write: one writer request per seed (label x topic x style x persona x length, drawn without
   repeats; with `synthesis.few_shot_from`, examples of the same label from your rows come first)
   runs on the teacher's Ray Data + vLLM actor pool, sampled for variety, without the teacher's
   context (its worked examples show how to answer, not how to write);
2. round trip: each written text becomes a prompt (one of `synthesis.questions`, the task's
   system prompt first) and the teacher answers it greedily, with its context, as it will
   generate; a prompt whose answer is not the label it was written for is dropped
   (`inconsistent`): the label is what the teacher itself reads in the text, not only what it
   was asked to write. With `curation.calibrate: batch` the answers are read calibrated, as
   curation will read the teacher's answers to these prompts;
3. checks: empty and refused writings, exact and MinHash near-duplicates of each other
   (`near_duplicate`) and of any prompt of the run's test sets or `evaluation.extra_sets`
   (`test_leak`: nothing written may leak into evaluation);
4. the kept prompts go to `--out` as JSONL that `prepare` reads (`prompt`, `reference` = the
   label), with a kept/dropped table beside it (`<out>.table.json`), as curation has.

Tasks without labels (qa, math, summarization, conversation) need `few_shot_from`: the teacher
writes new prompts like your examples, without references; there is no round trip (no label to
check), only the other checks, and training then uses the teacher's answers (sequence KD).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distill import schema as S
from distill.config import RunConfig, SamplingConfig
from distill.config.data import LABELLED_TASKS
from distill.curate_rules import REFUSAL_RE, format_table, reason_table
from distill.errors import UserError
from distill.rundir import RunDir

REASONS = ("error", "empty", "refusal", "inconsistent", "duplicate", "near_duplicate", "test_leak")


def _few_shot(cfg: RunConfig) -> list[dict[str, Any]]:
    from distill.chat import TaskPrompt
    from distill.prepare import normalise, read_raw
    from distill.storage import locate

    if not cfg.synthesis.few_shot_from:
        return []
    rows = []
    for where, raw in read_raw(locate(cfg.synthesis.few_shot_from), "synthesis.few_shot_from"):
        if isinstance(raw, Exception):
            raise UserError(f"synthesis.few_shot_from {where}: {raw}")
        row = normalise(raw, cfg.task.type, TaskPrompt())
        rows.append({"text": row[S.MESSAGES][-1]["content"], "label": row[S.REFERENCE]})
    return rows


def seeds(cfg: RunConfig, labels: list[str] | None, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`synthesis.n` writer requests: distinct seed combinations (cycled when n exceeds them), each
    with its label, writer messages and the question that will wrap the written text."""
    syn = cfg.synthesis
    rng = random.Random(syn.seed)
    combos = list(itertools.product(labels or [None], syn.topics, syn.styles, syn.personas, syn.lengths))
    rng.shuffle(combos)
    out = []
    for i in range(syn.n):
        label, topic, style, persona, length = combos[i % len(combos)]
        shots = [e for e in examples if label is None or e["label"] == label]
        shots = rng.sample(shots, min(syn.few_shot_k, len(shots)))
        if label is not None:
            ask = syn.writer_prompt.format(label=label, topic=topic, style=style, persona=persona, length=length)
        else:
            ask = "Write one new request of the same kind as these examples, different from all of them. Write only the request."
        if shots:
            ask = "Examples:\n" + "\n".join(f"- {e['text']}" for e in shots) + "\n\n" + ask
        out.append({S.ID: f"synth-{syn.seed}-{i:06d}", S.SPLIT: "train", S.TASK: cfg.task.type,
                    S.MESSAGES: [{"role": "user", "content": ask}], S.REFERENCE: label,
                    "question": rng.choice(syn.questions)})
    return out


def _shingles(text: str) -> set[str]:
    words = " ".join(text.lower().split()).split()
    return {" ".join(words[j:j + 3]) for j in range(max(1, len(words) - 2))}


def check(candidates: list[dict[str, Any]], answers: list[str | None], task, test_texts: list[str],
          threshold: float) -> list[str | None]:
    """Reason per written candidate (None = kept). `candidates[i]` has `text` (the writing),
    `label` (None for unlabelled tasks) and `error`; `answers[i]` the teacher's answer to the
    prompt made from it (None: not asked, no label to check)."""
    from datasketch import MinHash, MinHashLSH

    def minhash(text: str) -> MinHash:
        mh = MinHash(num_perm=64, seed=1)
        mh.update_batch([s.encode() for s in _shingles(text)])
        return mh

    tests = MinHashLSH(threshold=threshold, num_perm=64)
    for j, text in enumerate(test_texts):
        tests.insert(f"t{j}", minhash(text))
    written = MinHashLSH(threshold=threshold, num_perm=64)
    seen: set[str] = set()
    reasons: list[str | None] = []
    for i, (cand, answer) in enumerate(zip(candidates, answers)):
        text = cand["text"].strip()
        key = " ".join(text.lower().split())
        mh = minhash(text) if text else None
        if cand.get("error"):
            reason = "error"
        elif not text:
            reason = "empty"
        elif REFUSAL_RE.search(text[:300]):
            reason = "refusal"
        elif cand["label"] is not None and task.extract(answer or "") != cand["label"]:
            reason = "inconsistent"
        elif key in seen:
            reason = "duplicate"
        elif tests.query(mh):
            reason = "test_leak"
        elif written.query(mh):
            reason = "near_duplicate"
        else:
            reason = None
            written.insert(f"w{i}", mh)
        seen.add(key)
        reasons.append(reason)
    return reasons


def _test_texts(cfg: RunConfig, rd: RunDir) -> list[str]:
    """The user-visible text of every evaluation prompt: the run's test sets (and the set to
    choose on, `shifted_validation`) and the extra sets."""
    import pyarrow.compute as pc

    from distill.prepare import read_eval_set

    texts = []
    if rd.prompts.list_files(".parquet"):
        prompts = rd.prompts.read_table()
        held_out = pa.array([*S.EVAL_SPLITS, S.SHIFTED_VALIDATION])
        for messages in prompts.filter(pc.is_in(prompts[S.SPLIT], held_out))[S.MESSAGES].to_pylist():
            texts.append(messages[-1]["content"])
    for extra in cfg.evaluation.extra_sets:
        texts += [r[S.MESSAGES][-1]["content"] for r in read_eval_set(extra.path, extra.name, cfg)]
    return texts


def _generate(cfg: RunConfig, rows: list[dict[str, Any]], folder, sampling: SamplingConfig,
              top_k: int = 0) -> list[dict]:
    """The teacher's rows for `rows`, in their order: id, text and error, and with `top_k` the
    token ids and top-k too."""
    from distill.generate import run_pool
    from distill.topk_codec import expanded_table

    folder.remove()
    table = pa.Table.from_pylist([{k: r.get(k) for k in S.PROMPT_SCHEMA.names} for r in rows], schema=S.PROMPT_SCHEMA)
    run_pool(cfg, table, len(table), folder.uri, sampling, top_k)
    columns = [S.ID, S.TEXT, S.ERROR] + ([S.TOKEN_IDS, S.TOPK, S.TOPK_IDS, S.TOPK_LOGPROBS] if top_k else [])
    by_id = {r[S.ID]: r for r in expanded_table(folder.read_table(columns=columns)).to_pylist()}
    return [by_id[r[S.ID]] for r in rows]


def calibrated_answers(cfg: RunConfig, task, answered: list[dict[str, Any]]) -> list[str | None]:
    """The round trip's answers read as curation reads the teacher (`curation.calibrate: batch`):
    `calibrated_labels` with the teacher's tokenizer."""
    from distill.calibration import LabelCalibration
    from distill.tokenizers import text_codec

    return calibrated_labels(LabelCalibration(task, *text_codec(cfg.teacher.path)), answered)


def calibrated_labels(calibration, answered: list[dict[str, Any]]) -> list[str | None]:
    """The label each round-trip answer states once calibrated (`distill.calibration`; the prior is
    the teacher's mean label probability over these answers, to texts written evenly per label).
    An answer it cannot read stays as it is. Without this the round trip keeps only what the
    uncalibrated teacher reads back, and a teacher leaning to one label drops most of the texts
    written for the other."""
    from distill.calibration import label_mass, log_prior

    answers = [calibration.answer(row) for row in answered]
    total, n = label_mass(answers, len(calibration.labels))
    if n == 0:
        print("[synth] the round trip is read uncalibrated: no answer states a label its top-k covers", flush=True)
        return [row[S.TEXT] for row in answered]
    prior = log_prior(total, n)
    print("[synth] the round trip is calibrated as curation calibrates; the teacher's mean label probability: "
          + ", ".join(f"{label} {p:.2f}" for label, p in zip(calibration.labels, np.exp(prior))), flush=True)
    return [row[S.TEXT] if a is None else calibration.labels[int(np.argmax(a.scores - prior))]
            for row, a in zip(answered, answers)]


def synthesize(cfg: RunConfig, out: str, n: int | None = None) -> dict[str, Any]:
    """Write, check and save new prompts; returns the kept/dropped table."""
    from distill.tasks import task_from_config

    if cfg.teacher.kind != "vllm":
        raise UserError("distill data synth --by-teacher needs a vllm teacher (teacher.kind=vllm)")
    if n is not None:
        cfg = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"n": n})})
    task = task_from_config(cfg.task)
    labels = cfg.synthesis.labels or getattr(task, "labels", None) if cfg.task.type in LABELLED_TASKS else None
    examples = _few_shot(cfg)
    if labels is None and not examples:
        raise UserError(f"task.type={cfg.task.type} has no labels to write for: set synthesis.few_shot_from "
                         "to a file of your own prompts to write new ones like them")
    rd = RunDir(cfg)
    with rd.lock("distill data synth --by-teacher"):
        work = rd.root.join("synthesis")
        requests = seeds(cfg, labels, examples)
        print(f"[synth] the teacher writes {len(requests)} texts ({len(labels or [])} labels)", flush=True)
        # the teacher's context (worked examples of the task) is for answering, not for writing
        writer = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"system_prompt": None,
                                                                                 "few_shot": []})})
        written = _generate(writer, requests, work.join("written"), cfg.synthesis.sampling)
        candidates = [{"text": w[S.TEXT] or "", "label": r[S.REFERENCE], "error": w[S.ERROR],
                       "prompt": r["question"].format(text=(w[S.TEXT] or "").strip())}
                      for r, w in zip(requests, written)]
        answers: list[str | None] = [None] * len(candidates)
        if labels is not None:  # the round trip: the teacher answers what it wrote
            system = task.system_prompt()
            asks = [{S.ID: r[S.ID], S.SPLIT: "train", S.TASK: cfg.task.type, S.REFERENCE: r[S.REFERENCE],
                     S.MESSAGES: ([{"role": "system", "content": system}] if system else [])
                     + [{"role": "user", "content": c["prompt"]}]} for r, c in zip(requests, candidates)]
            calibrate = cfg.curation.calibrate != "off"
            answered = _generate(cfg, asks, work.join("round_trip"), cfg.evaluation.sampling,
                                 top_k=cfg.generation.top_k_logprobs if calibrate else 0)
            answers = calibrated_answers(cfg, task, answered) if calibrate else [a[S.TEXT] for a in answered]
        reasons = check(candidates, answers, task, _test_texts(cfg, rd), cfg.synthesis.near_threshold)
    kept = [c for c, r in zip(candidates, reasons) if r is None]
    table = written_table(candidates, reasons)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for c in kept:
            row = {"id": "w-" + hashlib.sha256(c["prompt"].encode()).hexdigest()[:12], "prompt": c["prompt"]}
            if c["label"] is not None:
                row["reference"] = c["label"]
            f.write(json.dumps(row) + "\n")
    Path(out + ".table.json").write_text(json.dumps(table, indent=2) + "\n")
    print(format_table(table))
    if table["kept_by_label"]:  # the round trip keeps what the teacher reads back: labels may come out unbalanced
        print("[synth] kept per label: " + ", ".join(f"{label} {n}" for label, n in table["kept_by_label"].items()))
    print(f"[synth] kept {len(kept)} of {len(candidates)} written prompts -> {out} (table: {out}.table.json)")
    return table


def written_table(candidates: list[dict[str, Any]], reasons: list[str | None]) -> dict[str, Any]:
    """The kept/dropped table of the written prompts, with a few examples per reason and the kept
    prompts per label (labelled tasks)."""
    examples: dict[str, list[str]] = {}
    for c, r in zip(candidates, reasons):
        if r and len(examples.setdefault(r, [])) < 3:
            examples[r].append(c["text"])
    kept = [c for c, r in zip(candidates, reasons) if r is None]
    table = reason_table(reasons, examples, len(candidates), len(kept), order=REASONS)
    by_label = Counter(c["label"] for c in kept if c["label"] is not None)
    table["kept_by_label"] = dict(sorted(by_label.items()))
    return table
