"""Two teachers in one run on real models: the embedded default with half its prompts routed to
an endpoint teacher (the same SmolLM2 behind vLLM's own OpenAI server) and half to the vLLM actor.

    .venv/bin/python bench/two_teachers.py --out runs/two_teachers --seeds 0,1,2 [--baseline runs/default] [key=value ...]

The prompts are the default's (the same ids, so the same splits), written as a JSONL file whose
odd rows say `"teacher": "api"`; the endpoint teacher gets the same context (worked examples) as
the main one and the student's tokenizer, so its rows carry token ids and top-20 like the actor's.
What this shows: a routed run of real engines end to end (rows, kept rows and cost per teacher,
the student's figures next to a one-teacher run's), not that two teachers beat one: here both are
the same model. Writes `<out>/two_teachers.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def routed_prompts(path: Path) -> int:
    """The default config's prompts (its synth source, main and shifted rows, same ids) as JSONL,
    every other row routed to `api`."""
    from distill.builtin_data import synth_rows
    from distill.config import load_config

    src = load_config(ROOT / "configs" / "default.yaml").data.source
    rows = list(synth_rows(src.name, src.n, src.seed)) + [
        {**r, "split": "shifted"} for r in synth_rows(src.name, src.shifted_n, src.seed, bank="shifted")]
    with path.open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, **({"teacher": "api"} if i % 2 else {})}) + "\n")
    return len(rows)


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server on loopback, on the CPU (what a user would point an endpoint at)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                               "--max-model-len", "1024"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {server.returncode}: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(2)
    server.kill()
    raise RuntimeError("vLLM's server did not answer within 600 s")


def main() -> None:
    from distill.model_files import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/two_teachers")
    ap.add_argument("--baseline", help="a one-teacher run directory of the default config to compare with")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. curation.calibrate=off")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    count = routed_prompts(prompts)
    api = {"kind": "endpoint", "base_url": f"http://127.0.0.1:{args.port}/v1", "model": "smollm2",
           "tokenizer": "builtin:smollm2-135m-instruct", "few_shot": "configs/tune/sentiment_few_shot.jsonl",
           "max_concurrency": 16, "requests_per_minute": None, "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}}
    import yaml

    from distill.config import read_yaml

    raw = read_yaml(ROOT / "configs" / "default.yaml", "config")  # the default, prompts from the routed file
    raw.update(run_dir=str(out / "run"), teachers={"api": api})
    raw["data"]["source"] = {"kind": "file", "path": str(prompts)}
    raw["evaluation"]["min_kept_ratio"] = None  # figures for every seed, whatever they are
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    seeds = [int(s) for s in args.seeds.split(",")]
    server = start_server(resolve_model("builtin:smollm2-135m-instruct"), args.port, out / "server.log")
    result: dict = {"prompts": count, "overrides": args.overrides, "seeds": {}}
    try:
        for seed in seeds:  # the first runs every stage; the others only train and evaluate again
            start = time.time()
            done = subprocess.run([sys.executable, "-m", "distill.cli", "run", "-c", str(config),
                                   f"training.seed={seed}", *args.overrides], cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"distill run exited with {done.returncode}")
            report = json.loads((out / "run" / "eval" / "report.json").read_text())
            result["seeds"][seed] = {"pipeline_s": round(time.time() - start, 1), "scores": report["summary"]["scores"],
                                     "kept_bare": report["summary"].get("kept_bare")}
            if "teachers" not in result:
                manifest = json.loads((out / "run" / "manifest.json").read_text())
                result.update(teachers=report.get("teachers"),
                              stages_s={k: v.get("wall_s") for k, v in manifest["stages"].items()})
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.baseline:
        base = json.loads((Path(args.baseline) / "eval" / "report.json").read_text())["summary"]
        result["baseline_scores"] = base["scores"]
    print(json.dumps(result, indent=2))
    (out / "two_teachers.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
