"""Would dividing out a trained student's own lean between the labels help, measured without labels?

    .venv/bin/python bench/student_lean.py RUN_DIR [RUN_DIR ...] [--prompts runs/c24a/base/prompts]

For each run's exported student (Hugging Face, fp32, 2 threads), reads its probability of each of
the task's labels at the first answer token, renormalised over the labels, on every prompt of the
validation, `shifted_validation`, `shifted` and test splits, and on 300 of the original train
prompts (no reworded copies, no references read). The lean is the mean over those train prompts;
each set's accuracy is reported by argmax as it is and with the probabilities divided by the lean
(as `curation.calibrate: batch` treats the teacher's), with how many prompts each way gets the
first label. Writes bench/results/student_lean.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from distill.augment import is_copy
from distill.chat import prompt_token_ids

ROOT = Path(__file__).resolve().parent.parent
SETS = ("validation", "shifted_validation", "shifted", "test")
TRAIN_PROMPTS = 300


def label_probabilities(model, tok, rows: list[dict], label_ids: list[int], batch: int = 16) -> np.ndarray:
    """[N, labels]: each row's probability of each label's first token, renormalised over the labels."""
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = [prompt_token_ids(tok, r["messages"]) for r in rows[i:i + batch]]
            width = max(map(len, ids))
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            x = torch.tensor([[pad] * (width - len(a)) + a for a in ids])  # left-padded: the last position answers
            mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in ids])
            p = torch.softmax(model(input_ids=x, attention_mask=mask).logits[:, -1].float(), -1)[:, label_ids]
            out.append((p / p.sum(-1, keepdim=True)).numpy())
    return np.concatenate(out)


def main() -> None:
    import pyarrow.dataset as ds
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories with an exported student/")
    ap.add_argument("--prompts", default="runs/c24a/base/prompts", help="the runs' prepared prompts")
    ap.add_argument("--labels", default="negative,positive")
    args = ap.parse_args()
    torch.set_num_threads(2)
    labels = args.labels.split(",")
    rows = ds.dataset(args.prompts).to_table().to_pylist()
    originals = [r for r in rows if r["split"] == "train" and not is_copy(r["id"])]
    train = [originals[i] for i in np.random.default_rng(0).choice(len(originals), TRAIN_PROMPTS, replace=False)]
    sets = {s: [r for r in rows if r["split"] == s] for s in SETS}
    results = {}
    for run in args.runs:
        path = str(Path(run) / "student")
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        label_ids = [tok.encode(label, add_special_tokens=False)[0] for label in labels]
        lean = label_probabilities(model, tok, train, label_ids).mean(0)
        figures = {"lean": dict(zip(labels, lean.round(4).tolist()))}
        for name, set_rows in sets.items():
            p = label_probabilities(model, tok, set_rows, label_ids)
            ref = np.array([labels.index(r["reference"]) for r in set_rows])
            raw, divided = p.argmax(1), (p / lean).argmax(1)
            figures[name] = {"accuracy": round(float((raw == ref).mean()), 4),
                             "accuracy_lean_divided": round(float((divided == ref).mean()), 4),
                             f"answered_{labels[0]}": int((raw == 0).sum()),
                             f"answered_{labels[0]}_lean_divided": int((divided == 0).sum())}
        results[run] = figures
        print(run, json.dumps(figures))
    (ROOT / "bench" / "results" / "student_lean.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
