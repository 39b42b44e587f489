"""The `distill` command: parses arguments, loads the config, calls a stage. No logic here.

    distill run --config configs/default.yaml              # the whole pipeline
    distill prepare|generate|curate|train|evaluate --config C [key=value ...]
    distill data synth --task sentiment --n 600 --seed 0 --out data/sentiment.jsonl
    distill config --config C [key=value ...]              # print the resolved config
    distill serve runs/default [key=value ...]             # teacher + student + `ab` over HTTP
    distill ab-report --url http://127.0.0.1:8000 --out runs/default/serve
    distill submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml run --config C
    distill check-cluster --config C --cluster cluster/aws.yaml   # do the config's actors fit?
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from distill.config import ConfigError, dump_config, load_config
from distill.curate_rules import CurationGateError

# stage name -> "module:function"; imported lazily so `distill --help` does not load Ray
STAGES = {
    "prepare": "distill.data:prepare",
    "generate": "distill.teacher:generate",
    "curate": "distill.curate:curate",
    "train": "distill.train:train",
    "evaluate": "distill.evaluate:evaluate",
    "run": "distill.pipeline:run",
}


def _stage(name: str):
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="LLM distillation on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        p = sub.add_parser(name, help=f"run the {name} stage" if name != "run" else "run the whole pipeline")
        p.add_argument("--config", "-c", help="YAML run config (default: built-in defaults)")
        p.add_argument("--force", action="store_true", help="redo the stage even if its output is up to date")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p = sub.add_parser("config", help="validate and print the resolved config")
    p.add_argument("--config", "-c")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("serve", help="host teacher and student behind an OpenAI-compatible A/B endpoint")
    p.add_argument("target", help="a run directory (after `distill run`) or a config file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("ab-report", help="per-arm figures of a running `distill serve`")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", help="folder for ab_report.json/.md/.png")
    p.add_argument("--api-key-env", default="DISTILL_API_KEY")
    p = sub.add_parser("submit", help="run a stage or the pipeline as a Ray job on a cluster")
    p.add_argument("--address", default=None, help="the cluster's dashboard URL (default: $RAY_ADDRESS)")
    p.add_argument("--runtime-env", help="YAML runtime env (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="STAGE [--config C] [key=value ...]")
    p = sub.add_parser("check-cluster", help="check that a config's actors fit a cluster's node types")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--cluster", required=True, help="launcher YAML or KubeRay manifest")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the built-in dataset as JSONL")
    synth.add_argument("--task", default="sentiment", choices=["sentiment", "nli", "math"])
    synth.add_argument("--n", type=int, default=600)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            from distill.synth import synth_rows, write_jsonl

            count = write_jsonl(synth_rows(args.task, args.n, args.seed), args.out)
            print(f"wrote {count} {args.task} rows to {args.out}")
            return 0
        if args.command == "ab-report":
            from serve.report import ab_report

            ab_report(args.url, args.out, args.api_key_env)
            return 0
        if args.command == "serve":
            from serve.app import load_target, serve_forever

            serve_forever(load_target(args.target, args.overrides))
            return 0
        if args.command == "submit":
            from distill.submit import submit

            job = argparse.ArgumentParser(prog="distill submit [options]")
            job.add_argument("stage", choices=[*STAGES, "config"])
            job.add_argument("--config", "-c")
            job.add_argument("overrides", nargs="*", metavar="key=value")
            job_args = job.parse_intermixed_args(args.job)

            address = args.address or os.environ.get("RAY_ADDRESS")
            if not address:
                raise ValueError("--address is required (the dashboard URL, e.g. http://HEAD:8265) "
                                 "or set RAY_ADDRESS")
            load_config(job_args.config, job_args.overrides)  # a bad config fails here, not on the cluster
            return submit(address, job_args.stage, job_args.config, job_args.overrides, args.runtime_env,
                          args.working_dir, wait=not args.no_wait)
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-cluster":
            from distill.cluster import check_resources, node_types

            problems = check_resources(cfg, node_types(args.cluster))
            for problem in problems:
                print(f"does not fit: {problem}", file=sys.stderr)
            print(f"{args.config} {'does not fit' if problems else 'fits'} {args.cluster}")
            return 1 if problems else 0
        if args.command == "config":
            print(dump_config(cfg), end="")
            return 0
        _stage(args.command)(cfg, force=args.force)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ConnectionError, CurationGateError) as e:
        # user-facing failures (bad data, curation gate, missing files): no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
