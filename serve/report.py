"""`distill ab-report`: the per-arm comparison of a running A/B endpoint, printed and saved.

    distill ab-report --url http://127.0.0.1:8000 --out runs/default/serve

Reads `/admin/stats` (with the admin key from `--admin-key-env`, DISTILL_ADMIN_KEY by default,
when the server has one) and writes `ab_report.json`, `ab_report.md` and `ab_report.png` under
`--out`: per arm, requests, error rate, p50 latency, feedback and (with shadow traffic) agreement
with the teacher, each with its 95% interval, and the one-line verdicts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from distill.errors import Unreachable, UserError

COLUMNS = [("requests", "requests"), ("errors", "errors"), ("dropped", "dropped"),
           ("error_rate", "error rate"), ("latency_p50_s", "p50 s"), ("latency_p95_s", "p95 s"),
           ("ttft_p50_s", "TTFT p50 s"), ("tokens_per_request", "tokens/req"), ("feedback_count", "feedback n"),
           ("feedback_mean", "feedback mean"), ("agreement_n", "shadowed"), ("agreement", "agreement")]
WITH_CI = {"error_rate": "error_rate_ci", "latency_p50_s": "latency_p50_ci", "feedback_mean": "feedback_ci",
           "agreement": "agreement_ci"}


def fetch_stats(url: str, api_key: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/admin/stats", headers=headers, timeout=timeout_s)
    except (httpx.TransportError, httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
        raise Unreachable(f"--url {url}: no `distill serve` answers there ({type(e).__name__}: {e}); "
                              "is it running, and is the port right?") from None
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise UserError(f"{url}/admin/stats answered {resp.status_code}: {message}")
    return resp.json()


def _fmt(value: Any, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else text


def to_markdown(stats: dict[str, Any]) -> str:
    lines = [f"# A/B report ({time.strftime('%Y-%m-%d %H:%M:%S')})", "",
             f"Weights (version {stats['weights_version']}): "
             + ", ".join(f"{arm} {w:g}" for arm, w in stats["weights"].items())
             + f"; figures over the last {stats['since_s']:.0f} s of serving, 95% intervals in brackets.", ""]
    lines += [f"**{v}**" for v in stats.get("verdicts", [])] + ([""] if stats.get("verdicts") else [])
    for route, title in (("ab", "Traffic split by the `ab` alias"), ("direct", "Requests naming a model")):
        arms = stats["arms"].get(route) or {}
        lines += [f"## {title}", ""]
        if not arms:
            lines += ["(none)", ""]
            continue
        lines += ["| arm | " + " | ".join(h for _, h in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        lines += [f"| {arm} | " + " | ".join(_fmt(fig.get(k), fig.get(WITH_CI.get(k, ""))) for k, _ in COLUMNS) + " |"
                  for arm, fig in arms.items()]
        lines += [""] + _comparison(arms) + [""]
    return "\n".join(lines)


def _comparison(arms: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per non-teacher arm against the teacher, the question people ask first."""
    teacher = arms.get("teacher")
    out = []
    for arm, fig in arms.items():
        if arm == "teacher" or not teacher or not fig["latency_p50_s"] or not teacher["latency_p50_s"]:
            continue
        line = f"{arm}: p50 latency {fig['latency_p50_s'] / teacher['latency_p50_s']:.2f}x the teacher's"
        if fig["feedback_mean"] is not None and teacher["feedback_mean"] is not None:
            line += (f"; feedback {fig['feedback_mean']:.3g} (n={fig['feedback_count']}) vs "
                     f"{teacher['feedback_mean']:.3g} (n={teacher['feedback_count']})")
        out.append(line + ".")
    return out


def plot(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = stats["arms"].get("ab") or stats["arms"].get("direct") or {}
    names = list(arms)
    fig, (lat, fb, agree) = plt.subplots(1, 3, figsize=(12, 3.5))
    x = range(len(names))
    lat.bar([i - 0.2 for i in x], [arms[n]["latency_p50_s"] or 0 for n in names], 0.4, label="p50")
    lat.bar([i + 0.2 for i in x], [arms[n]["latency_p95_s"] or 0 for n in names], 0.4, label="p95")
    lat.set_xticks(list(x), names)
    lat.set_ylabel("latency (s)")
    lat.legend()
    fb.bar(list(x), [arms[n]["feedback_mean"] or 0 for n in names])
    fb.set_xticks(list(x), [f"{n}\n(n={arms[n]['feedback_count']})" for n in names])
    fb.set_ylabel("mean feedback score")
    shadowed = [n for n in names if arms[n].get("agreement") is not None]
    agree.bar(range(len(shadowed)), [arms[n]["agreement"] for n in shadowed],
              yerr=[[arms[n]["agreement"] - arms[n]["agreement_ci"][0] for n in shadowed],
                    [arms[n]["agreement_ci"][1] - arms[n]["agreement"] for n in shadowed]], capsize=4)
    agree.set_xticks(range(len(shadowed)), [f"{n}\n(n={arms[n]['agreement_n']})" for n in shadowed])
    agree.set_ylim(0, 1)
    agree.set_ylabel("agreement with the teacher")
    fig.suptitle("A/B per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ab_report(url: str, out: str | None, admin_key_env: str = "DISTILL_ADMIN_KEY") -> dict[str, Any]:
    stats = fetch_stats(url, os.environ.get(admin_key_env) or None)
    markdown = to_markdown(stats)
    print(markdown)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ab_report.json").write_text(json.dumps(stats, indent=2))
        (folder / "ab_report.md").write_text(markdown)
        plot(stats, folder / "ab_report.png")
        print(f"[ab-report] saved {folder}/ab_report.md, .json, .png")
    return stats
