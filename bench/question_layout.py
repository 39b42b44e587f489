"""Does a student read the review, or the place of the question? Its score with the instruction
moved to the other end of each prompt, on the splits choices are made on.

    .venv/bin/python bench/question_layout.py --prompts runs/default runs/default/student [more students]

For each student, greedy answers (Hugging Face `generate`, the prompt ids `distill.chat` gives
training and evaluation) to the validation and `shifted_validation` prompts whose message has an
instruction (`distill.chat.split_instruction`), as prepared and with the instruction moved ("The
lid broke.\\n\\nIs this review positive or negative?"), and moved then read as `task.instruction_first`
reads a prompt, scored against their references by the task. First it counts the prompts of
every split and extra set that `task.instruction_first` would rewrite. Only the choice splits are
scored: a choice made on this leaves test, `shifted` and the hand-written set to report.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

SPLITS = ("validation", "shifted_validation")
# (name, instruction moved to the other end, then read as `task.instruction_first` reads it)
LAYOUTS = (("as prepared", False, False), ("instruction moved", True, False),
           ("moved, read instruction first", True, True))


def main() -> None:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.chat import instruction_first, prompt_token_ids, split_instruction
    from distill.config import load_config
    from distill.prepare import read_eval_set
    from distill.tasks import task_from_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True, help="a run directory whose prompts are prepared")
    ap.add_argument("students", nargs="+", help="model directories (a run's student/, or any Hugging Face model)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="merge the figures as JSON into this file, by student")
    args = ap.parse_args()
    cfg = load_config(str(Path(args.prompts) / "config.yaml"), ["task.instruction_first=false"])
    task = task_from_config(cfg.task)
    prepared = pq.read_table(Path(args.prompts) / "prompts").to_pylist()
    rewritten = Counter(r["split"] for r in prepared if instruction_first(r["messages"]) != r["messages"])
    for extra in cfg.evaluation.extra_sets:
        rewritten[extra.name] = sum(instruction_first(r["messages"]) != r["messages"]
                                    for r in read_eval_set(extra.path, extra.name, cfg))
    print("prompts task.instruction_first rewrites:", dict(rewritten), "of", dict(Counter(r["split"] for r in prepared)))
    rows = [r for r in prepared if r["split"] in SPLITS and split_instruction(r["messages"][-1]["content"]).instruction]
    results = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    for student in args.students:
        tok = AutoTokenizer.from_pretrained(student)
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
        scores: dict[str, dict[str, float]] = {}
        for layout, moved, first in LAYOUTS:
            for split in SPLITS:
                picked = [r for r in rows if r["split"] == split]
                answers = []
                for r in picked:
                    *context, last = r["messages"]
                    asked = split_instruction(last["content"])
                    messages = [*context, {**last, "content": asked.asking(asked.text, moved)}]
                    ids = torch.tensor([prompt_token_ids(tok, instruction_first(messages) if first else messages)])
                    with torch.no_grad():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                             do_sample=False, pad_token_id=tok.eos_token_id)
                    answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
                primary = task.score(answers, [r["reference"] for r in picked])[task.primary]
                scores.setdefault(split, {})[layout] = round(float(primary), 4)
                print(f"{student}  {split:<20} {layout:<30} n={len(picked):<4} {task.primary} {primary:.3f}", flush=True)
        results[student] = scores
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
