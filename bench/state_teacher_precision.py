"""The hidden-state term's teacher in fp32 against bf16: one training step's parts, timed.

    .venv/bin/python bench/state_teacher_precision.py [--repeats 5]

Each step of the embedded default's recipe runs the teacher's 30 layers forward (for the states
the student's are pulled toward) and the 8-layer student forward and backward. This times both on
one micro-batch of the default's shape (8 examples x 96 tokens, random ids), with the threads a
training worker has (`training.cpus_per_worker`, 2), the teacher in fp32 and in bf16, the student
in bf16 as DeepSpeed trains it where bf16 is fast. It also reports how far the bf16 teacher's
states are from the fp32 teacher's, in the hidden-state term's own measure (relative squared error,
`distill.losses.hidden_state_loss`), beside the term's value at the end of training (about 0.2).
bf16 is only fast with AVX-512 BF16 or AMX, or on a GPU: elsewhere the recipe trains in fp32 and
the teacher stays fp32. Writes bench/results/state_teacher_precision.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from distill.hardware import fast_dtype
from distill.losses import hidden_state_loss
from distill.model_files import derive_student
from distill.train_loop import hidden_pairs, state_teacher

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "builtin:smollm2-135m-instruct"
LAYERS = [0, 4, 8, 12, 17, 21, 25, 29]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (8, 96))
    mask = torch.ones_like(ids)
    figures: dict = {"machine": platform.processor() or platform.machine(), "fast_dtype": fast_dtype("cpu"),
                     "batch": list(ids.shape), "threads": torch.get_num_threads()}
    states = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        teacher = state_teacher(TEACHER, 576, dtype)

        def forward(teacher=teacher, name=name):
            with torch.no_grad():
                states[name] = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        figures[f"teacher_forward_s_{name}"] = round(timed(forward, args.repeats), 4)
    made = derive_student(TEACHER, LAYERS, tempfile.mkdtemp() + "/student")
    student = AutoModelForCausalLM.from_pretrained(made, dtype=torch.bfloat16).get_decoder()

    def student_step():
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sum(s.float().pow(2).mean() for s in out).backward()
    figures["student_forward_backward_s_bf16"] = round(timed(student_step, args.repeats), 4)
    pairs = [t for _, t in hidden_pairs(LAYERS, "all")]  # the teacher's states the term reads
    figures["bf16_states_relative_error"] = float(hidden_state_loss(
        [states["bf16"][i] for i in pairs], [states["fp32"][i] for i in pairs], mask.bool()))
    figures["teacher_speedup_bf16"] = round(figures["teacher_forward_s_fp32"] / figures["teacher_forward_s_bf16"], 2)
    fp32_step = figures["teacher_forward_s_fp32"] + figures["student_forward_backward_s_bf16"]
    bf16_step = figures["teacher_forward_s_bf16"] + figures["student_forward_backward_s_bf16"]
    figures["step_speedup_bf16"] = round(fp32_step / bf16_step, 2)
    print(json.dumps(figures, indent=2))
    out = ROOT / "bench" / "results" / "state_teacher_precision.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
