"""How much of the task a layer subset of the teacher already knows, before any training.

    .venv/bin/python bench/probe_layers.py --run runs/default                  # after `make demo` (or prepare)
    .venv/bin/python bench/probe_layers.py --run runs/default --layers first8=0,1,2,3,4,5,6,7

A derived student is a subset of the teacher's layers. This runs each subset (embeddings, the
chosen blocks, the final norm) over every prompt, takes the hidden state of the last prompt
token (where the answer starts), fits a linear classifier on the `train` split's references and
scores it on every evaluation set: `test`, `shifted` and the config's `evaluation.extra_sets`.
A subset whose probe is near chance on a set has little to build the answer from there, and
training on a few hundred examples has to create that knowledge rather than reuse it.
Classification tasks only (references among `task.labels`). Results go to `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def last_token_states(model, layers: list[int], prompts: list[list[int]]):
    """[N, hidden] states of the last prompt token after `layers` of `model` and its final norm."""
    import torch

    blocks = [model.model.layers[i] for i in layers]
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            h = model.model.embed_tokens(x)
            pos = torch.arange(x.shape[1])[None]
            rope = model.model.rotary_emb(h, pos)
            for block in blocks:
                h = block(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
                h = h[0] if isinstance(h, tuple) else h
            out.append(model.model.norm(h)[0, -1])
    return torch.stack(out)


def probe(features: dict, labels: dict, l2: float = 0.1) -> dict[str, float]:
    """Multinomial logistic regression fitted on features['train'], accuracy on every set."""
    import torch

    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-5
    z = {s: (f - mean) / std for s, f in features.items()}
    classes = int(max(int(y.max()) for y in labels.values())) + 1
    w = torch.zeros(z["train"].shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z["train"] @ w + b, labels["train"])
        loss = loss + l2 * (w ** 2).sum() / len(labels["train"])
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {s: round(float(((z[s] @ w + b).argmax(1) == labels[s]).float().mean()), 3) for s in z if s != "train"}


def main() -> None:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.chat import prompt_token_ids
    from distill.config import load_config
    from distill.prepare import read_eval_set
    from distill.model_files import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--run", default="runs/default", help="a run directory whose prompts are prepared")
    ap.add_argument("--layers", action="append", default=[], help="name=i,j,k (repeatable)")
    ap.add_argument("--out", default="bench/results/probe_layers.json")
    ap.add_argument("--without-teacher", action="store_true", help="skip all 30 layers (the slowest subset)")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"run_dir={args.run}"])
    names = list(cfg.task.labels or [])
    if len(names) < 2:
        raise SystemExit("probe_layers: task.labels must list the classes (a classification task)")
    torch.manual_seed(0)
    if cfg.teacher.kind != "vllm":
        raise SystemExit("probe_layers: needs the teacher's weights (teacher.kind: vllm)")
    path = resolve_model(cfg.teacher.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = pq.read_table(Path(args.run) / "prompts").to_pylist()
    # validation and shifted_validation (when prepared) are the sets a layer choice is made on
    sets = {s: [r for r in rows if r["split"] == s]
            for s in ("train", "validation", "shifted_validation", "test", "shifted")}
    for extra in cfg.evaluation.extra_sets:
        sets[extra.name] = read_eval_set(extra.path, extra.name, cfg)
    sets = {s: [r for r in v if r["reference"] in names] for s, v in sets.items() if v}
    prompts = {s: [prompt_token_ids(tokenizer, r["messages"]) for r in v] for s, v in sets.items()}
    labels = {s: torch.tensor([names.index(r["reference"]) for r in v]) for s, v in sets.items()}
    n = len(model.model.layers)
    subsets = {"student": list(getattr(cfg.student, "layers", None) or []),
               "teacher": [] if args.without_teacher else list(range(n))}
    subsets.update({k: [int(i) for i in v.split(",")] for k, v in (a.split("=", 1) for a in args.layers)})
    results = {}
    for name, layers in subsets.items():
        if not layers:
            continue
        features = {s: last_token_states(model, layers, p) for s, p in prompts.items()}
        results[name] = {"layers": layers, "accuracy": probe(features, labels)}
        print(f"{name:>10} {len(layers):>2} layers  " +
              "  ".join(f"{s} {a:.3f}" for s, a in results[name]["accuracy"].items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "sets": {s: len(v) for s, v in sets.items()},
                               "subsets": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
