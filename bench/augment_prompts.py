"""Train prompts reworded with the teacher's nearest words (TinyBERT-style augmentation).

    .venv/bin/python bench/augment_prompts.py --run runs/c24/base --root runs/c24aug --copies 3 --replace 0.3
    .venv/bin/python bench/compare_methods.py --only mix --seeds 0 --root runs/c24aug --label 'augmented x3' \
        evaluation.validation=true

The student falls back to "positive" on wording it never saw. This gives it more wording to read,
without labels: each copy of a train prompt replaces about `--replace` of its one-token content
words by one of the word's `--top-k` nearest neighbours in the teacher's input embeddings
("terrible" -> "dreadful", "horrific", and sometimes "terrific"). The
copies join the train split with no reference; the teacher answers and calibration read them as
they read any prompt. Writes `--root`/base with the run's prompts and models, and the copies as a
second prompts part, so `compare_methods.py --root` generates only the copies' answers.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path


STOP = set("""the a an and or but so of to in on at for with by from as is are was were be been it its this that
these those my our your their his her i we you they me us them not no very too also just than then there here what
which who how when where why do does did have has had will would can could should may might all any some each every
after before about into over under again once one two""".split())


def neighbours(embeddings, tok, top: int) -> dict[int, list[int]]:
    """Token -> the `top` whole-word tokens nearest to it in the teacher's input embeddings
    (cosine), leaving out function words and forms of the same word ("broke", "breaking")."""
    import torch

    def word(t: int) -> str | None:
        s = tok.convert_ids_to_tokens(t)
        return s[1:] if s.startswith("Ġ") and s[1:].isalpha() and s[1:].islower() and len(s) > 3 else None

    ids = [t for t in range(embeddings.shape[0]) if (w := word(t)) and w not in STOP]
    unit = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)
    sims = unit @ unit.T
    out = {}
    for row, t in enumerate(ids):
        w = word(t)
        near = [ids[j] for j in sims[row].topk(4 * top).indices.tolist() if ids[j] != t]
        out[t] = [n for n in near if word(n)[:4] != w[:4]][:top]
    return out


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from distill.config import load_config
    from distill.model_files import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory whose prompts are prepared")
    ap.add_argument("--root", required=True, help="writes ROOT/base: the run's prompts plus the copies")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--replace", type=float, default=0.3, help="share of one-token words replaced per copy")
    ap.add_argument("--top-k", type=int, default=8, help="neighbours a word is drawn from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run, base = Path(args.run), Path(args.root) / "base"
    cfg = load_config(str(run / "config.yaml"), [f"run_dir={run}"])
    table = pq.read_table(sorted((run / "prompts").glob("part-*.parquet"))[0])
    train = [r for r in table.to_pylist() if r["split"] == "train"]
    model_dir = Path(resolve_model(cfg.teacher.path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            name = next((k for k in st.keys() if k.endswith("embed_tokens.weight")), None)
            if name:
                near = neighbours(st.get_tensor(name), tok, args.top_k)
    rng = random.Random(args.seed)
    rows, changed = [], []
    for row in train:
        ask, _, review = row["messages"][-1]["content"].partition("\n")  # the question form stays as it is
        ids = tok.encode(" " + review, add_special_tokens=False)  # " ": every word starts like a mid-text one
        for c in range(args.copies):
            new = list(ids)
            for i, t in enumerate(ids):
                after = "" if i + 1 == len(ids) else tok.convert_ids_to_tokens(ids[i + 1])
                whole = not after or after.startswith("Ġ") or not after[0].isalpha()
                if whole and near.get(t) and rng.random() < args.replace:
                    new[i] = rng.choice(near[t])
            if new == ids:
                continue
            changed.append(sum(a != b for a, b in zip(new, ids)))
            messages = [*row["messages"][:-1], {"role": "user", "content": ask + "\n" + tok.decode(new).lstrip()}]
            rows.append({**row, "id": f"aug{c}-{row['id']}", "messages": messages, "reference": None})
    print(f"[augment] {len(rows)} copies of {len(train)} train prompts, "
          f"{sum(changed) / max(len(changed), 1):.1f} words replaced per copy")
    for r in rows[:6]:
        print("  ", r["messages"][-1]["content"].replace("\n", " / "))
    base.mkdir(parents=True, exist_ok=True)
    for folder in ("prompts", "models"):
        if (run / folder).exists():
            shutil.copytree(run / folder, base / folder, dirs_exist_ok=True)
    shutil.copy(run / "config.yaml", base / "config.yaml")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), base / "prompts" / "part-00001.parquet")


if __name__ == "__main__":
    main()
