"""`mmpipe`: the library's commands (mmcore/cli.py) plus the app's: demo, serve, and the local stack."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from mmcore import cli as library_cli
from mmcore import console
from pipelines.services import DEFAULT_HOST, DEFAULT_PORTS, StackError, env_path, stack_dir, state_path, token_path
from pipelines.stack import client_env, down, running, status, up


def _home(args) -> Path:
    """The project home for this command; exported so the library, MLflow and Prefect all use it."""
    home = library_cli.home_of(args)
    os.environ["MMPIPE_HOME"] = str(home)
    # Flow-run records go beside the datasets and models (read at prefect's first import, which is later).
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # No telemetry: this machine may be offline, and the temporary API server's heartbeat writes
    # to its sqlite file while the flow starts ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary API server 20 s to answer; its first start in a new home (imports
    # from a cold disk, then the database migrations) took longer on a 2-core CI machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return home


def _demo_server(root: Path):
    from mmcore.data.server import FileServer

    try:
        return FileServer(root, port=library_cli.DEMO_PORT)
    except OSError:
        return FileServer(root, port=0)  # the usual port is taken: any free one


def _ensure_sample(root: Path, base_url: str, spec) -> Path:
    """Reuse the sample corpus if it was made for this address and spec, else (re)make it."""
    from mmcore.data.synthetic.corpus import make_sample

    info = root / "sample.json"
    made = json.loads(info.read_text()) if info.exists() else {}
    if made.get("base_url") == base_url and made.get("spec") == vars(spec):
        return root / "urls.parquet"
    shutil.rmtree(root, ignore_errors=True)
    return make_sample(root, base_url, spec)


QUICK = {"recipe": "debug", "language_recipe": "none", "fusion_recipe": "debug-fusion",
         "tokenizer_recipe": "debug-tokenizer", "unified_recipe": "debug-unified"}
"""`mmpipe demo --quick`: the smallest models for a few steps each, on QUICK_SAMPLE."""
QUICK_SAMPLE = {"synthetic": 1000, "digits": 300}
"""The quick demo's sample corpus (SampleSpec fields; the photos and planted defects as in the full one)."""
DEMO_QUERIES = ["a red circle above a blue square", "a handwritten digit seven"]
"""Searched with the new contrastive model; their contact sheets are attached to its MLflow run."""
FULL = {"recipe": "demo", "language_recipe": "none", "fusion_recipe": "demo-fusion",
        "tokenizer_recipe": "demo-tokenizer", "unified_recipe": "demo-unified"}


def cmd_demo(args) -> int:
    """Sample corpus on loopback -> the `retrain` flow (ingest, train, register, evaluate, promote)."""
    home = _home(args)
    from mmcore.config import TrackingConfig
    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.synthetic.corpus import SampleSpec
    from mmcore.tracking import resolve_uri
    from pipelines.flows import retrain_flow
    from pipelines.params import FusionSettings, IngestParams, LanguageSettings, RetrainParams, TokenizerSettings, \
        TrainSettings, UnifiedSettings

    for key, default in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    started = time.monotonic()
    sample_dir = home / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    spec = SampleSpec(**QUICK_SAMPLE) if args.quick else SampleSpec()
    with _demo_server(sample_dir) as server:
        url_list = _ensure_sample(sample_dir, server.url, spec)
        console.say(f"sample corpus at {sample_dir}, served at {server.url}")
        result = retrain_flow(RetrainParams(
            source=IngestParams(url_list=str(url_list), allow_networks=["127.0.0.1/32"]),
            instructions=IngestParams(url_list=str(sample_dir / "conversations.jsonl"), kind="instructions",
                                      allow_networks=["127.0.0.1/32"]), fusion_gated_on="dataset",
            train=TrainSettings(recipe=args.recipe), search_queries=DEMO_QUERIES,
            skip_language=args.language_recipe == "none",
            language=LanguageSettings(**_recipe(args.language_recipe)), skip_fusion=args.fusion_recipe == "none",
            fusion=FusionSettings(**_recipe(args.fusion_recipe), alignment_recipe=args.alignment_recipe),
            skip_unified=args.unified_recipe == "none",
            tokenizer=TokenizerSettings(**_recipe(args.tokenizer_recipe)),
            unified=UnifiedSettings(**_recipe(args.unified_recipe))))
    library_cli.print_summary(DatasetVersion.open(result.dataset["path"]))
    for _, decision in result.stages():
        if decision is not None:
            library_cli.print_report(decision.candidate)
            word = "promoted to champion" if decision.promoted else "not promoted"
            console.say(f"{decision.model_name} v{decision.candidate_version} {word}: {decision.reason}")
    library_cli.print_side_by_side(result.candidates())
    run_dirs = "\n".join(f"  run directory: {trained['run_dir']}" for trained, _ in result.stages())
    console.say(f"demo finished in {time.monotonic() - started:.0f}s as Prefect flow run 'retrain'; everything is "
                f"under {home}\n  MLflow: {resolve_uri(TrackingConfig())}\n  Prefect flow runs: "
                f"{os.environ['PREFECT_HOME']}\n{run_dirs}\n"
                f"  see the runs and models in their UIs with `mmpipe up`\n  logs: {console.log_file()}")
    return 0


def _recipe(name: str) -> dict:
    """A stage's recipe setting from a command-line choice ("none" skips the stage: its default stays)."""
    return {} if name == "none" else {"recipe": name}


def cmd_serve(args) -> int:
    """Register the deployments and run what they schedule, against the Prefect server of `mmpipe up`."""
    home = _home(args)
    for key, value in client_env(home).items():
        os.environ.setdefault(key, value)  # the running local stack, unless the caller points elsewhere
    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("mmpipe serve needs a Prefect server: start the local stack with `mmpipe up`, "
                         "or set PREFECT_API_URL to yours")
    from pipelines.deployments import serve_deployments

    console.out.print(f"serving deployments ingest/mmpipe, train/mmpipe, evaluate/mmpipe, retrain/mmpipe on "
          f"{os.environ['PREFECT_API_URL']} (retrain: cron {args.retrain_cron or 'off'}, on dataset.landed "
          f"{'on' if not args.no_retrain_on_landing else 'off'}, recipe {args.retrain_recipe}); Ctrl-C stops")
    serve_deployments(args.retrain_cron, not args.no_retrain_on_landing, args.retrain_recipe, args.limit,
                      args.retrain_fusion_recipe, args.retrain_tokenizer_recipe, args.retrain_unified_recipe)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser, commands = library_cli.build_parser()
    demo = commands.add_parser("demo", help="the whole pipeline on the sample corpus as Prefect flow runs, "
                                            "nothing to start by hand")
    demo.add_argument("--home", help="project home (default $MMPIPE_HOME or ~/.mmpipe)")
    demo.add_argument("--quick", action="store_true",
                      help="a few minutes instead of about 40: the debug recipes on a sample corpus of 1,557 rows, "
                           "to check that everything works (its models learn little)")
    demo.add_argument("--recipe", help="contrastive recipe (default demo; debug with --quick)")
    demo.add_argument("--language-recipe",
                      help="language recipe (demo-language, debug-language; default none: the stage is skipped)")
    demo.add_argument("--fusion-recipe",
                      help="fusion recipe on the new contrastive champion (default demo-fusion, debug-fusion with "
                           "--quick; none skips the stage; demo-instruction on the language champion, after "
                           "--alignment-recipe)")
    demo.add_argument("--alignment-recipe",
                      help="LLaVA's first phase before --fusion-recipe, on the language champion (demo-alignment)")
    demo.add_argument("--tokenizer-recipe",
                      help="image tokenizer recipe (default demo-tokenizer, debug-tokenizer with --quick)")
    demo.add_argument("--unified-recipe",
                      help="unified recipe on the new tokenizer champion (default demo-unified, debug-unified with "
                           "--quick; none skips the image tokenizer and the unified stage)")
    demo.set_defaults(func=cmd_demo)

    serve = commands.add_parser("serve", help="register the flows as deployments (Prefect UI: Run) and run them")
    serve.add_argument("--home", help="project home (default $MMPIPE_HOME or ~/.mmpipe)")
    serve.add_argument("--retrain-cron", default="", metavar="CRON",
                       help="schedule retrain, e.g. '0 3 * * 1' (default: no schedule)")
    serve.add_argument("--no-retrain-on-landing", action="store_true",
                       help="do not start retrain when a dataset version lands (event dataset.landed)")
    serve.add_argument("--retrain-recipe", default="demo", help="recipe of triggered retrains (default %(default)s)")
    serve.add_argument("--retrain-fusion-recipe", default="demo-fusion",
                       help="fusion recipe of triggered retrains (default %(default)s; none skips the stage)")
    serve.add_argument("--retrain-tokenizer-recipe", default="demo-tokenizer",
                       help="image tokenizer recipe of triggered retrains (default %(default)s)")
    serve.add_argument("--retrain-unified-recipe", default="demo-unified",
                       help="unified recipe of triggered retrains (default %(default)s; none skips the image "
                            "tokenizer and the unified stage)")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at a time (default %(default)s)")
    serve.set_defaults(func=cmd_serve)
    add_stack_commands(commands)
    return parser


def _default_home() -> str:
    return os.environ.get("MMPIPE_HOME", "~/.mmpipe")


def add_stack_commands(subparsers) -> None:
    """Add `up`, `status` and `down` to an argparse subparsers object; each sets func(args) -> int."""
    start = subparsers.add_parser("up", help="start Prefect, MLflow and a Ray head on this machine")
    _add_home(start)
    start.add_argument("--host", default=DEFAULT_HOST,
                       help="address to bind (default 127.0.0.1; any other needs --auth)")
    start.add_argument("--auth", action="store_true",
                       help="basic auth on Prefect and MLflow, a password generated into <home>/stack/credentials.json "
                            "(required off loopback; Ray always uses its token)")
    for key, port in DEFAULT_PORTS.items():
        start.add_argument("--" + key.replace("_", "-") + "-port", dest=f"{key}_port", type=int, default=port,
                           help=f"default {port}")
    start.add_argument("--artifacts", default="",
                       help="where MLflow keeps model artifacts: s3://bucket/prefix (credentials and endpoint from "
                            "the AWS variables of this shell) or a directory; default <home>/mlartifacts")
    start.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for every server to answer its health check")
    start.set_defaults(func=cmd_up)
    show = subparsers.add_parser("status", help="show which stack servers run and answer their health checks")
    _add_home(show)
    show.set_defaults(func=cmd_status)
    stop = subparsers.add_parser("down", help="stop every server `mmpipe up` started")
    _add_home(stop)
    stop.set_defaults(func=cmd_down)


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=_default_home(), help="project home (default $MMPIPE_HOME or ~/.mmpipe)")


def _error(err: Exception) -> int:
    console.err.print(f"mmpipe: error: {err}")
    return 2


def cmd_up(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser()
    ports = {key: getattr(args, f"{key}_port") for key in DEFAULT_PORTS}
    alive = running(home)
    if alive and all(alive.values()):
        console.out.print(f"the stack is already running (state in {state_path(home)})")
    elif not any(alive.values()):
        console.out.print(f"starting prefect, mlflow and ray on {args.host} (logs in {stack_dir(home) / 'logs'}) ...")
    else:
        stopped = ", ".join(name for name, ok in alive.items() if not ok)
        console.out.print(f"restarting {stopped} (stopped); the other servers keep running")
    try:
        urls = up(home, host=args.host, ports=ports, timeout_s=args.timeout, auth=args.auth,
                  artifacts=args.artifacts)
    except (StackError, ValueError, OSError) as err:
        return _error(err)
    _print_urls(home, urls)
    return 0


def _print_urls(home: Path, urls: dict[str, str]) -> None:
    console.out.print(f"Prefect UI     {urls['prefect_ui']}")
    console.out.print(f"MLflow UI      {urls['mlflow_ui']}")
    console.out.print(f"Ray dashboard  {urls['ray_dashboard']}  (token: {token_path(home)})")
    console.out.print(f"Ray address    {urls['ray_address']}" + (f"  or {urls['ray_client']}" if "ray_client" in urls else ""))
    console.out.print(f"\n# for clients (also in {env_path(home)}: `source {env_path(home)}`)")
    for key, value in client_env(home, urls).items():
        secret = key in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")  # shown only in the 0600 file
        console.out.print(f"export {key}={'<in the file above>' if secret else shlex.quote(value)}")


def cmd_status(args: argparse.Namespace) -> int:
    rows = status(Path(args.home))
    console.out.print(f"{'service':<9}{'state':<10}{'pid':<9}{'healthy':<9}url")
    for row in rows:
        state = "running" if row["running"] else "stopped"
        pid = str(row["pid"] or "-")
        console.out.print(f"{row['service']:<9}{state:<10}{pid:<9}{'yes' if row['healthy'] else 'no':<9}{row['url'] or '-'}")
    return 0 if all(row["healthy"] for row in rows) else 1


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stopped = down(Path(args.home))
    except StackError as err:
        return _error(err)
    console.out.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def main(argv: list[str] | None = None) -> int:
    return library_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
