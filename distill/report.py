"""The evaluation report: `eval/report.json`, a readable `eval/report.md`, and PNG plots
(score per model, latency vs score, training loss curve)."""

from __future__ import annotations

import io
from typing import Any

from distill.rundir import RunDir


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    primary = s["primary_metric"]
    lines = ["# Distillation report", "",
             f"{s['test_prompts']} held-out test prompts; headline metric: **{primary}**.", ""]
    if "student_kept_pct" in s:
        lines.append(f"The distilled student keeps **{s['student_kept_pct']}%** of the teacher's {primary} "
                     f"({s['student_' + primary]:.3f} vs {s['teacher_' + primary]:.3f})"
                     + (f"; the baseline student keeps {s['baseline_kept_pct']}%." if "baseline_kept_pct" in s else "."))
    if "latency_speedup" in s:
        lines.append(f"It answers {s['latency_speedup']}x faster (p50 latency), with "
                     f"{s['throughput_ratio']}x the teacher's batch throughput and "
                     f"{s['weights_ratio']:.0%} of its weights.")
    lines += ["", "| model | " + " | ".join(["params (M)", "weights MB", primary, "agreement",
                                                "p50 s", "p95 s", "TTFT s", "tok/s", "peak MB"]) + " |",
              "|" + "---|" * 10]
    for name, m in report["models"].items():
        score = m.get("metrics", {}).get(primary)
        agree = m.get("agreement", {}).get(primary)
        cells = [f"{m['parameters'] / 1e6:.1f}", f"{m['weights_mb']:.0f}",
                 f"{score:.3f}" if score is not None else "-", f"{agree:.3f}" if agree is not None else "-",
                 f"{m['latency_p50_s']:.3f}", f"{m['latency_p95_s']:.3f}", f"{m['ttft_p50_s']:.3f}",
                 f"{m['tokens_per_s']}", f"{m['peak_memory_mb']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "All metrics per model:", ""]
    for name, m in report["models"].items():
        lines.append(f"- {name}: {m.get('metrics', {})}" + (f"; agreement with teacher {m['agreement']}" if "agreement" in m else ""))
    lines += ["", "| stage | wall s | accelerator s | tokens | cost |", "|---|---|---|---|---|"]
    for stage, st in report["stages"].items():
        lines.append(f"| {stage} | {st['wall_s']} | {st['accelerator_s']} | {st['tokens'] or '-'} | {st['cost']} |")
    lines += ["", "![score per model](score.png) ![latency vs score](latency_vs_score.png) "
              "![training loss](loss.png)", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(report: dict[str, Any], history: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = report["summary"]["primary_metric"]
    models = {n: m for n, m in report["models"].items() if "metrics" in m}
    out = {}
    colors = {"teacher": "tab:blue", "student": "tab:green", "baseline": "tab:gray"}
    if models:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = list(models)
        ax.bar(names, [models[n]["metrics"][primary] for n in names], color=[colors.get(n, "tab:orange") for n in names])
        ax.set_ylabel(primary)
        ax.set_title(f"{primary} on the test split")
        out["score.png"] = _png(fig)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for n in names:
            ax.scatter(models[n]["latency_p50_s"], models[n]["metrics"][primary], s=60, label=n, color=colors.get(n))
        ax.set_xlabel("p50 latency per request (s)")
        ax.set_ylabel(primary)
        ax.legend()
        ax.set_title("quality vs latency")
        out["latency_vs_score.png"] = _png(fig)
        plt.close(fig)
    steps = [h for h in history if "loss" in h]
    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([h["step"] for h in steps], [h["loss"] for h in steps], label="train loss")
        val = [h for h in history if h.get("val_loss") is not None]
        if val:
            ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.set_title("student training")
        out["loss.png"] = _png(fig)
        plt.close(fig)
    return out


def write_report(rd: RunDir, report: dict[str, Any]) -> None:
    history_loc = rd.root.join("train_history.json")
    history = history_loc.read_json() if history_loc.exists() else []
    rd.eval.join("report.json").write_json(report)
    rd.eval.join("report.md").write_text(_markdown(report))
    for name, data in _plots(report, history).items():
        loc = rd.eval.join(name)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
