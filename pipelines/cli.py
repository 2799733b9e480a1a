"""`mmpipe`: the library's commands (mmcore/cli.py) plus the app's: demo, serve, and the local stack."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mmcore import cli as library_cli
from mmcore import console
from pipelines import stack


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


def _ensure_sample(root: Path, base_url: str) -> Path:
    """Reuse the sample corpus if it was made for this address, else (re)make it."""
    from mmcore.data.synthetic.corpus import make_sample

    info = root / "sample.json"
    if info.exists() and json.loads(info.read_text()).get("base_url") == base_url:
        return root / "urls.parquet"
    shutil.rmtree(root, ignore_errors=True)
    return make_sample(root, base_url)


def cmd_demo(args) -> int:
    """Sample corpus on loopback -> the `retrain` flow (ingest, train, register, evaluate, promote)."""
    home = _home(args)
    from mmcore.config import TrackingConfig
    from mmcore.data.dataset import DatasetVersion
    from mmcore.tracking import resolve_uri
    from pipelines.flows import retrain_flow
    from pipelines.params import FusionSettings, IngestParams, RetrainParams, TokenizerSettings, TrainSettings, \
        UnifiedSettings

    started = time.monotonic()
    sample_dir = home / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    with _demo_server(sample_dir) as server:
        url_list = _ensure_sample(sample_dir, server.url)
        console.say(f"sample corpus at {sample_dir}, served at {server.url}")
        result = retrain_flow(RetrainParams(
            source=IngestParams(url_list=str(url_list), allow_networks=["127.0.0.1/32"]),
            train=TrainSettings(recipe=args.recipe), skip_fusion=args.fusion_recipe == "none",
            fusion=FusionSettings(**_recipe(args.fusion_recipe)), skip_unified=args.unified_recipe == "none",
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
    for key, value in stack.client_env(home).items():
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
    demo.add_argument("--recipe", default="demo", help="training recipe (default %(default)s; debug is quicker)")
    demo.add_argument("--fusion-recipe", default="demo-fusion",
                      help="fusion recipe on the new contrastive champion (default %(default)s; none skips the stage)")
    demo.add_argument("--tokenizer-recipe", default="demo-tokenizer", help="image tokenizer recipe (default %(default)s)")
    demo.add_argument("--unified-recipe", default="demo-unified",
                      help="unified recipe on the new tokenizer champion (default %(default)s; none skips the image "
                           "tokenizer and the unified stage)")
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
    stack.add_stack_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return library_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
