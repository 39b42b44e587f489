"""The evaluation report: figures with 95% intervals per set, `eval/report.json`, a readable
`eval/report.md`, and PNG plots (score per model and set with intervals, latency vs score,
training loss)."""

from __future__ import annotations

import io
from typing import Any

from distill.config import RunConfig
from distill.errors import UserError
from distill.rundir import RunDir
from distill.stats import diff_ci, mean_ci, ratio_ci, resample_indices, separation, statistic_ci
from distill.tasks import Task

CORPUS_RESAMPLES = 200  # corpus metrics (macro-F1, BLEU) recompute per resample: fewer of them


def _scored(task: Task, preds: list[str], refs: list[str], idx) -> dict[str, Any]:
    items = task.item_scores(preds, refs)
    out = {"metrics": {}, "ci": {}, "items": items}
    for metric, values in items.items():
        out["metrics"][metric] = sum(values) / len(values) if values else 0.0
        out["ci"][metric] = mean_ci(values, idx)
    for metric, value in task.corpus_scores(preds, refs).items():
        out["metrics"][metric] = value
        out["ci"][metric] = statistic_ci(
            lambda rows: task.corpus_scores([preds[i] for i in rows], [refs[i] for i in rows])[metric],
            idx[:CORPUS_RESAMPLES])
    return out


def set_figures(task: Task, rows: list[dict], texts: dict[str, list[str]], samples: int) -> dict[str, Any]:
    """One set's figures: every model's metrics against the references (and agreement with the
    teacher), with intervals; each student's share of the teacher kept; the verdict sentence.

    A set whose prompts have no references (a user's own prompts) is scored against the teacher's
    answers instead (`against: teacher`): a model's metric is then its agreement with the
    teacher, the teacher's own is how often its answer can be read at all (an unparsable answer
    agrees with nothing), and "kept" is the student's agreement over the teacher's."""
    referenced = all(r["reference"] is not None for r in rows)
    if not referenced and "teacher" not in texts:
        raise UserError("a set without references is scored against the teacher's answers, and this run "
                         "evaluates no teacher: set teacher.path (or add references to the prompts)")
    refs = [r["reference"] for r in rows] if referenced else texts["teacher"]
    idx = resample_indices(len(rows), samples, seed=len(rows))
    models, items = {}, {}
    for name, preds in texts.items():
        scored = _scored(task, preds, refs, idx)
        items[name] = scored.pop("items")
        models[name] = scored
        if referenced and "teacher" in texts and name != "teacher":
            agree = _scored(task, preds, texts["teacher"], idx)
            models[name]["agreement"], models[name]["agreement_ci"] = agree["metrics"], agree["ci"]
    out = {"n": len(rows), "against": "reference" if referenced else "teacher", "models": models, "kept": {}}
    primary = task.primary
    for teacher, kept in (("teacher", "kept"), ("teacher_bare", "kept_bare")):
        if teacher not in items:
            continue
        t = items[teacher][primary]
        t_mean = sum(t) / len(t)
        for name in items:
            if not name.startswith("teacher"):
                s = items[name][primary]
                value = (sum(s) / len(s)) / t_mean if t_mean else None
                out.setdefault(kept, {})[name] = {"value": value, "ci": ratio_ci(s, t, idx)}
    if "teacher" in items:
        t = items["teacher"][primary]
        if "student" in items:
            s = items["student"][primary]
            diff = (sum(s) - sum(t)) / len(t)
            out["difference"] = {"value": diff, "ci": diff_ci(s, t, idx)}
    return out


def build_report(cfg: RunConfig, rd: RunDir, task: Task, sets: dict[str, list[dict]],
                 texts: dict[str, list[str]], results: dict[str, dict]) -> dict[str, Any]:
    primary = task.primary
    figures, offset = {}, 0
    for name, rows in sets.items():
        part = {m: t[offset: offset + len(rows)] for m, t in texts.items()}
        figures[name] = set_figures(task, rows, part, cfg.evaluation.bootstrap_samples)
        offset += len(rows)
    summary: dict[str, Any] = {"primary_metric": primary, "sets": {s: len(r) for s, r in sets.items()},
                               "against": {s: f["against"] for s, f in figures.items()}, "kept": {}, "verdicts": []}
    for name, fig in figures.items():
        for model, m in fig["models"].items():
            summary.setdefault("scores", {}).setdefault(name, {})[model] = {
                "value": m["metrics"][primary], "ci": m["ci"][primary]}
        if "student" in fig["kept"]:
            summary["kept"][name] = fig["kept"]["student"]
        if "student" in fig.get("kept_bare", {}):
            summary.setdefault("kept_bare", {})[name] = fig["kept_bare"]["student"]
        if "difference" in fig:
            d = fig["difference"]
            metric = primary if fig["against"] == "reference" else f"{primary} (agreement with the teacher)"
            summary["verdicts"].append(separation(d["value"], d["ci"], fig["n"], name, metric))
    teacher, student = results.get("teacher"), results.get("student")
    if teacher and student:
        summary["latency_speedup"] = round(teacher["latency_p50_s"] / student["latency_p50_s"], 2)
        summary["throughput_ratio"] = round((student["tokens_per_s"] or 0) / (teacher["tokens_per_s"] or 1), 2)
        summary["weights_ratio"] = (round(student["weights_mb"] / teacher["weights_mb"], 3)
                                    if teacher["weights_mb"] else None)
        summary["parameters_ratio"] = (round(student["parameters"] / teacher["parameters"], 3)
                                       if teacher["parameters"] else None)
    manifest = rd.manifest()
    price = cfg.evaluation.price_per_accelerator_hour
    stages = {}
    for stage, st in manifest.get("stages", {}).items():
        stages[stage] = {"wall_s": st.get("wall_s"), "accelerator_s": st.get("accelerator_s", 0.0),
                         "tokens": st.get("output_tokens") or st.get("tokens"),
                         "cost": round((st.get("accelerator_s") or 0.0) / 3600 * price, 4)}
    report = {"summary": summary, "sets": figures, "models": results, "stages": stages,
              "price_per_accelerator_hour": price}
    if cfg.teachers:
        report["teachers"] = teacher_table(manifest.get("stages", {}))
    curated = manifest.get("stages", {}).get("curate", {}).get("table")
    if curated:  # what the student learned from: how much curation kept and rewrote
        report["curation"] = {k: curated.get(k) for k in ("responses", "kept", "kept_relabelled", "calibration")}
    return report


def teacher_table(stages: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per teacher of a run with several: the prompts routed to it, its responses, how many
    curation kept, its output tokens, text-only rows and cost (from the stages' stats)."""
    made = stages.get("generate", {}).get("teachers", {})
    kept = stages.get("curate", {}).get("teachers", {})
    out = {}
    for name, g in made.items():
        out[name] = {"prompts": g.get("prompts"), "responses": g.get("rows"), "kept": kept.get(name, {}).get("kept"),
                     "output_tokens": g.get("output_tokens"), "text_only": g.get("text_only", 0),
                     "cost": g.get("cost"), "accelerator_s": g.get("accelerator_s")}
    return out


# ----------------------------------------------------------------------------- markdown


def curation_line(c: dict[str, Any]) -> str:
    """One sentence on the training data: responses kept, answers rewritten, the teacher's calibration."""
    line = (f"The student learned from {c['kept']} of the teacher's {c['responses']} responses (curation's table: "
            f"`curated/_table.json`), {c.get('kept_relabelled') or 0} of them with their label rewritten.")
    calibration = c.get("calibration")
    if calibration:
        from distill.calibration import describe

        line += f" Calibrated (`curation.calibrate`) against {describe(calibration)}."
    return line


def _pm(value: float | None, ci: tuple[float, float] | list[float] | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else f"{100 * value:.1f}%"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    primary = s["primary_metric"]
    unreferenced = [name for name, fig in report["sets"].items() if fig.get("against") == "teacher"]
    lines = ["# Distillation report", "",
             f"Headline metric: **{primary}**, with 95% bootstrap intervals in brackets. Sets: "
             + ", ".join(f"`{name}` ({n} prompts)" for name, n in s["sets"].items()) + "."
             + (f" {', '.join(f'`{n}`' for n in unreferenced)} ha{'ve' if len(unreferenced) > 1 else 's'} no "
                f"references: {primary} there is agreement with the teacher's answers (the teacher's own: the "
                "share of its answers that state one), since accuracy needs references." if unreferenced else ""),
             ""]
    lines += [f"- {v}" for v in s["verdicts"]]
    if "latency_speedup" in s:
        size = (f", {s['parameters_ratio']:.0%} of its parameters and {s['weights_ratio']:.0%} of its weight bytes"
                if s.get("parameters_ratio") else "")
        lines += ["", f"The student answers {s['latency_speedup']}x faster (p50 latency), with "
                      f"{s['throughput_ratio']}x the teacher's batch throughput{size}."]
    models = list(report["models"])
    bare = "teacher_bare" in models
    if bare:
        lines += ["", "`teacher` answered with its own context (system prompt, worked examples), as it generated "
                      "the training data; `teacher_bare` is the same model on the task's prompt, as a user would call it."]
    lines += ["", "| set | " + " | ".join(models) + " | student keeps |" + (" of the bare teacher |" if bare else ""),
              "|" + "---|" * (len(models) + 2 + bare)]
    for name, fig in report["sets"].items():
        cells = [_pm(fig["models"][m]["metrics"][primary], fig["models"][m]["ci"][primary]) for m in models]
        kept = fig["kept"].get("student")
        kept_bare = fig.get("kept_bare", {}).get("student")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pm(kept['value'], kept['ci'], True) if kept else '-'} |"
                     + (f" {_pm(kept_bare['value'], kept_bare['ci'], True) if kept_bare else '-'} |" if bare else ""))
    lines += ["", "| model | params (M) | weights MB | p50 s | p95 s | TTFT s | tok/s | peak MB |", "|" + "---|" * 8]
    for name, m in report["models"].items():
        size = (f"{m['parameters'] / 1e6:.1f} | {m['weights_mb']:.0f}" if m["parameters"] else "- | -")
        peak = f"{m['peak_memory_mb']:.0f}" if m["peak_memory_mb"] is not None else "-"
        lines.append(f"| {name} | {size} | {m['latency_p50_s']:.3f} | "
                     f"{m['latency_p95_s']:.3f} | {m['ttft_p50_s']:.3f} | {m['tokens_per_s']} | {peak} |")
    lines += ["", "All metrics (agreement = the same metric against the teacher's answers):", ""]
    for name, fig in report["sets"].items():
        for model, m in fig["models"].items():
            metrics = ", ".join(f"{k} {_pm(v, m['ci'][k])}" for k, v in m["metrics"].items())
            agree = m.get("agreement")
            lines.append(f"- {name} / {model}: {metrics}"
                         + (f"; agreement {primary} {_pm(agree[primary], m['agreement_ci'][primary])}" if agree else ""))
    if report.get("teachers"):
        lines += ["", "Each teacher's share of the training data (`teacher:<name>` above is that teacher on every set):",
                  "", "| teacher | prompts | responses | kept by curation | output tokens | text-only | "
                  "accelerator s | endpoint cost |", "|" + "---|" * 8]
        for name, t in report["teachers"].items():
            lines.append(f"| {name} | {t['prompts']} | {t['responses']} | {t['kept'] if t['kept'] is not None else '-'} | "
                         f"{t['output_tokens']} | {t['text_only']} | {t['accelerator_s']} | "
                         f"{t['cost'] if t['cost'] is not None else '-'} |")
    if report.get("curation"):
        lines += ["", curation_line(report["curation"])]
    lines += ["", "| stage | wall s | accelerator s | tokens | cost |", "|---|---|---|---|---|"]
    for stage, st in report["stages"].items():
        lines.append(f"| {stage} | {st['wall_s']} | {st['accelerator_s']} | {st['tokens'] or '-'} | {st['cost']} |")
    lines += ["", "![score per model and set](score.png) ![latency vs score](latency_vs_score.png) "
              "![training loss](loss.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

COLORS = {"teacher": "tab:blue", "teacher_bare": "tab:cyan", "student": "tab:green", "baseline": "tab:gray",
          "gold_control": "tab:orange"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(report: dict[str, Any], history: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    primary = report["summary"]["primary_metric"]
    models, sets = list(report["models"]), list(report["sets"])
    out = {}
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(sets), 3.4))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        vals = [report["sets"][s]["models"][model]["metrics"][primary] for s in sets]
        cis = [report["sets"][s]["models"][model]["ci"][primary] for s in sets]
        err = np.array([[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]])
        ax.bar(np.arange(len(sets)) + j * width, vals, width, yerr=err, capsize=3, label=model,
               color=COLORS.get(model, "tab:purple"))
    ax.set_xticks(np.arange(len(sets)) + width * (len(models) - 1) / 2, sets)
    ax.set_ylabel(primary)
    ax.set_title(f"{primary} per set (95% intervals)")
    # below the axes: inside, it covers the tallest bars' intervals
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(models), frameon=False)
    out["score.png"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for model in models:
        score = report["sets"]["test"]["models"][model]["metrics"][primary]
        ax.scatter(report["models"][model]["latency_p50_s"], score, s=60, label=model, color=COLORS.get(model))
    ax.set_xlabel("p50 latency per request (s)")
    ax.set_ylabel(f"{primary} (test)")
    ax.legend(fontsize=8)
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
    rd.eval.join("report.md").write_text(markdown(report))
    for name, data in _plots(report, history).items():
        loc = rd.eval.join(name)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
