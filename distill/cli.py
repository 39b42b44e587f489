"""The `distill` command: parses arguments, loads the config, calls a stage. No logic here.

    distill run --config configs/default.yaml              # the whole pipeline
    distill run --config C --force train,evaluate          # redo some stages
    distill prepare|generate|curate|train|evaluate --config C [--force] [key=value ...]
    distill data synth --task sentiment --n 600 --seed 0 --out data/sentiment.jsonl
    distill data synth --by-teacher -c C --out data/written.jsonl    # the teacher writes prompts
    distill data from-serve --url http://127.0.0.1:8000 --out data/round2.jsonl   # the flywheel
    distill tune --config C --candidates T [--write F]     # choose the teacher's prompt on validation
    distill config --config C [key=value ...]              # print the resolved config
    distill config --explain [SECTION]                     # every field, default, description
    distill serve runs/default [key=value ...]             # teacher + student + `ab` over HTTP
    distill ab-report --url http://127.0.0.1:8000 --out runs/default/serve
    distill submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml run --config C
    distill check-cluster --config C --cluster cluster/aws.yaml   # do the config's actors fit?
"""

from __future__ import annotations

import argparse
import os
import sys

from distill.config import ConfigError, dump_config, load_config
from distill.errors import DistillError, UserError
from distill.ray_utils import VERBOSE_ENV, quiet_process, verbose

STAGE_COMMANDS = ("prepare", "generate", "curate", "train", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="LLM distillation on Ray")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's and vLLM's own output and every traceback (or DISTILL_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_serving_commands(sub)
    _add_cluster_commands(sub)
    _add_data_commands(sub)
    return parser


def _add_pipeline_commands(sub) -> None:
    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"run the {name} stage")
        p.add_argument("--config", "-c", help="YAML run config (default: built-in defaults)")
        p.add_argument("--force", action="store_true",
                       help="delete this stage's current output and redo it")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p = sub.add_parser("run", help="run the whole pipeline")
    p.add_argument("--config", "-c", help="YAML run config (default: built-in defaults)")
    p.add_argument("--force", nargs="?", const=True, default=False, metavar="STAGES",
                   help="redo these stages (comma-separated, e.g. train,evaluate; alone: all)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p = sub.add_parser("tune", help="choose the teacher's prompt, context and sampling on the validation split")
    p.add_argument("--config", "-c", help="YAML run config (its prompts must be prepared)")
    p.add_argument("--candidates", required=True, help="YAML file of named candidates (e.g. configs/tune/sentiment.yaml)")
    p.add_argument("--limit", type=int, help="use the first N validation prompts")
    p.add_argument("--write", metavar="FILE", help="write the config with the chosen candidate applied")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p = sub.add_parser("config", help="validate and print the resolved config")
    p.add_argument("--config", "-c")
    p.add_argument("--explain", nargs="?", const="", default=None, metavar="SECTION",
                   help="print every field (or a section's) with its default and description")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _add_serving_commands(sub) -> None:
    p = sub.add_parser("serve", help="host teacher and student behind an OpenAI-compatible A/B endpoint")
    p.add_argument("target", help="a run directory (after `distill run`) or a config file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("ab-report", help="per-arm figures of a running `distill serve`")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", help="folder for ab_report.json/.md/.png")
    p.add_argument("--admin-key-env", default="DISTILL_ADMIN_KEY", help="variable holding the admin key")


def _add_cluster_commands(sub) -> None:
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


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the built-in dataset as JSONL")
    synth.add_argument("--task", default="sentiment", choices=["sentiment", "nli", "math"])
    synth.add_argument("--n", type=int, default=None, help="rows (default 600; with --by-teacher: synthesis.n)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--bank", default="main", choices=["main", "shifted", "shifted_validation"],
                       help="phrase bank: main (training data), shifted (unseen wording), shifted_validation "
                            "(other unseen wording, to choose on; sentiment only)")
    synth.add_argument("--by-teacher", action="store_true",
                       help="the teacher writes new prompts (the config's `synthesis` section), checked by a "
                            "round trip, deduplicated and kept out of every test set")
    synth.add_argument("--config", "-c", help="with --by-teacher: the run config (teacher, task, synthesis)")
    synth.add_argument("--out", required=True)
    synth.add_argument("overrides", nargs="*", metavar="key=value", help="with --by-teacher: config overrides")
    fly = data.add_parser("from-serve", help="export the prompts a `distill serve` recorded (serving.record_prompts)")
    fly.add_argument("--url", default="http://127.0.0.1:8000")
    fly.add_argument("--out", required=True)
    fly.add_argument("--admin-key-env", default="DISTILL_ADMIN_KEY")


# ----------------------------------------------------------------------------- commands
# each returns the exit code


def _data(args) -> int:
    if args.data_command == "from-serve":
        from serve.flywheel import export_prompts

        export_prompts(args.url, args.out, args.admin_key_env)
    elif args.by_teacher:
        from distill.synthesis import synthesize

        synthesize(load_config(args.config, args.overrides), args.out, args.n)
    else:
        from distill.builtin_data import synth_rows, write_jsonl

        count = write_jsonl(synth_rows(args.task, args.n or 600, args.seed, args.bank), args.out)
        print(f"wrote {count} {args.task} rows to {args.out}")
    return 0


def _ab_report(args) -> int:
    from serve.report import ab_report

    ab_report(args.url, args.out, args.admin_key_env)
    return 0


def _serve(args) -> int:
    from serve.app import load_target, serve_forever

    serve_forever(load_target(args.target, args.overrides))
    return 0


def _submit(args) -> int:
    from distill.submit import submit

    job = argparse.ArgumentParser(prog="distill submit [options]")
    job.add_argument("stage", choices=[*STAGE_COMMANDS, "run", "config"])
    job.add_argument("--config", "-c")
    job.add_argument("overrides", nargs="*", metavar="key=value")
    job_args = job.parse_intermixed_args(args.job)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address is required (the dashboard URL, e.g. http://HEAD:8265) or set RAY_ADDRESS")
    load_config(job_args.config, job_args.overrides)  # a bad config fails here, not on the cluster
    return submit(address, job_args.stage, job_args.config, job_args.overrides, args.runtime_env,
                  args.working_dir, wait=not args.no_wait)


def _check_cluster(args) -> int:
    from distill.cluster import check_resources, node_types

    problems = check_resources(load_config(args.config, args.overrides), node_types(args.cluster))
    for problem in problems:
        print(f"does not fit: {problem}", file=sys.stderr)
    print(f"{args.config} {'does not fit' if problems else 'fits'} {args.cluster}")
    return 1 if problems else 0


def _tune(args) -> int:
    from distill.rundir import RunDir
    from distill.tune import tune

    cfg = load_config(args.config, args.overrides)
    tune(cfg, RunDir(cfg), args.candidates, args.limit, args.write)
    return 0


def _config(args) -> int:
    cfg = load_config(args.config, args.overrides)  # validated also when only explaining
    if args.explain is not None:
        from distill.config.explain import explain

        print(explain(args.explain or None), end="")
    else:
        print(dump_config(cfg), end="")
    return 0


def _run(args) -> int:
    from distill.pipeline import run

    force = args.force
    if isinstance(force, str) and "=" in force:  # `--force key=value`: an override, not stages
        args.overrides.insert(0, force)
        force = True
    run(load_config(args.config, args.overrides), force=force, cfg_path=args.config)
    return 0


def _stage(args) -> int:
    from distill.stages import run_stage

    run_stage(args.command, load_config(args.config, args.overrides), force=args.force, cfg_path=args.config)
    return 0


COMMANDS = {"data": _data, "ab-report": _ab_report, "serve": _serve, "submit": _submit,
            "check-cluster": _check_cluster, "tune": _tune, "config": _config, "run": _run,
            **dict.fromkeys(STAGE_COMMANDS, _stage)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray's and vLLM's own output, and tracebacks (ray_utils)
    if not verbose():
        quiet_process()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DistillError as e:
        # failures a person can act on (bad data, a gate, an unfinished upstream stage, a busy run
        # directory, a missing file): one line; anything else is a bug and keeps its traceback
        if verbose():
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
