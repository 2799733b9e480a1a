"""`mmpipe ...`: a thin command line over the same functions the flows and tests call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmcore import console
from mmcore.config import from_dict, project_home, to_dict
from mmcore.data.config import GuardConfig, IngestConfig, SourceConfig
from mmcore.data.synthetic.corpus import SampleSpec
from mmcore.hub import BUNDLERS
from mmcore.stages import STAGES

DEMO_PORT = 8765


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg, overrides: list[str]):
    """Return a copy of `cfg` with dotted `field.sub=value` overrides (values parsed as JSON)."""
    data = to_dict(cfg)
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected field=value, e.g. download.image_size=128")
        node = data
        parts = name.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"--set {item!r}: unknown field {name!r}")
        node[parts[-1]] = _parse_value(value)
    return from_dict(type(cfg), data)


def print_summary(version) -> None:
    """A dataset version in one table: counts, splits, and every rejection reason with its count."""
    from rich.table import Table

    m = version.manifest
    rows = m["rows"]
    head = Table(title=f"dataset {m['id']}", show_header=False)
    head.add_row("path", str(version.path))
    head.add_row("source", f"{m['source']['path']} ({m['source']['format']}, sha256 {m['source']['sha256'][:12]})")
    head.add_row("rows in", str(rows["in"]))
    head.add_row("kept", str(rows["kept"]))
    reasons = sorted(rows["rejected"].items(), key=lambda kv: -kv[1])
    head.add_row("rejected", f"{sum(rows['rejected'].values())}" +
                 (": " + ", ".join(f"{reason} {count} ({count / rows['in']:.1%})" for reason, count in reasons)
                  if reasons else ""))
    head.add_row("splits", ", ".join(f"{k} {v}" for k, v in m["splits"].items()))
    head.add_row("shards", str(len(m["shards"])))
    head.add_row("tokenizer", f"BPE, {m['tokenizer']['vocab_size']} tokens")
    head.add_row("extra columns", ", ".join(m["source"]["extras"]) or "-")
    card = m.get("card", {})
    head.add_row("kind", version.kind)
    if m.get("filtered_from"):
        f = m["filtered_from"]
        head.add_row("filtered from", f"dataset {f['dataset_id']} at {f['path']}: {f['by']}")
    for name, spread in card.items():
        if isinstance(spread, dict) and "median" in spread:
            head.add_row(name.replace("_", " "), ", ".join(f"{k} {v}" for k, v in spread.items()))
    if card.get("languages"):
        judged = sum(card["languages"].values())
        head.add_row("languages", ", ".join(f"{code} {count / judged:.0%}"
                                            for code, count in card["languages"].items()))
    from mmcore.data.derived import stored

    for derived in stored(version):  # what registered models computed over it (data/derived.py)
        m = derived.manifest
        head.add_row("derived", f"{m['kind']} by {m['model']} ({', '.join(m['columns'])}; "
                                f"{sum(s['bytes'] for s in m['shards']) / 1e6:.1f} MB) at {derived.path.name}")
    console.out.print(head)


def cmd_sample_make(args) -> int:
    from mmcore.data.synthetic.corpus import make_sample

    spec = SampleSpec(synthetic=args.synthetic, digits=args.digits, photos=not args.no_photos,
                      defects=not args.no_defects, seed=args.seed, conversations=args.conversations, noise=args.noise)
    url_list = make_sample(args.dir, args.base_url, spec)
    console.out.print(f"wrote {url_list} (serve it with: mmpipe sample serve {args.dir} --port "
          f"{args.base_url.rsplit(':', 1)[-1].split('/')[0]})")
    return 0


def cmd_sample_serve(args) -> int:
    from mmcore.data.server import FileServer

    server = FileServer(args.dir, host=args.host, port=args.port)
    console.out.print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_ingest(args) -> int:
    from mmcore.data.ingest import ingest

    cfg = IngestConfig(
        source=SourceConfig(path=args.url_list, format=args.format, url_col=args.url_col,
                            caption_col=args.caption_col, kind=args.kind, images=args.images),
        out=args.out, work_dir=args.work_dir, guard=GuardConfig(allow_networks=args.allow_network or []),
    )
    version = ingest(apply_overrides(cfg, args.set or []))
    print_summary(version)
    return 0


def cmd_dataset_show(args) -> int:
    from mmcore.data.dataset import DatasetVersion

    print_summary(DatasetVersion.open(args.dir))
    return 0


def cmd_dataset_verify(args) -> int:
    from mmcore.data.dataset import DatasetVersion

    version = DatasetVersion.open(args.dir)
    from mmcore.data.derived import stored

    problems = version.verify() + [f"{derived.path / 'shards' / name}: {problem} (computed again when next read)"
                                   for derived in stored(version) for name, problem in derived.problems().items()]
    for problem in problems:
        console.out.print(f"FAIL {problem}")
    if problems:
        console.out.print(f"dataset {version.id}: {len(problems)} problem(s)")
        return 1
    files = len(version.manifest["files"])
    console.out.print(f"dataset {version.id}: OK ({files} files, {version.manifest['rows']['kept']} rows verified)")
    return 0


def cmd_train(args) -> int:
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit

    name = args.recipe or STAGES[args.stage].recipe
    cfg = recipe(name, args.dataset)
    if cfg.task.stage != args.stage:
        raise ValueError(f"recipe {name} trains the {cfg.task.stage} stage, not {args.stage}")
    overrides = list(args.set or [])
    if args.ray_address:
        overrides.append(f"cluster.address={json.dumps(args.ray_address)}")
    result = fit(apply_overrides(cfg, overrides))
    console.out.print(json.dumps({"run": result.run_name, "model": result.model_uri, "alias": cfg.tracking.alias,
                      "mlflow_run_id": result.mlflow_run_id, "run_dir": result.run_dir,
                      "metrics": {k: result.metrics[k] for k in ("loss", "val_loss", "samples_per_second")
                                  if k in result.metrics}}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from mmcore.eval.run import evaluate

    report = evaluate(args.uri, args.dataset, args.suite, classes=args.classes)
    print_report(report)
    return 0 if report.ok else 1


def print_report(report) -> None:
    """A row per metric (chance beside it; * marks each suite's primary), narrow enough for 80 columns."""
    from rich.table import Table

    table = Table(title=f"{report.model_name} v{report.model_version} on dataset {report.dataset_id} "
                        f"(MLflow run {report.mlflow_run_id})", caption="* the suite's primary metric")
    for column in ("suite", "metric", "value"):
        table.add_column(column, no_wrap=True)
    table.add_column("chance")
    for suite_name, metrics in report.metrics.items():
        primary = report.primaries[suite_name]
        shown = [primary] + [k for k in metrics if k not in (primary, "n") and not k.startswith("chance")]
        label = f"{suite_name} (n={int(metrics['n'])})" if "n" in metrics else suite_name
        for i, key in enumerate(shown):
            chance = metrics.get(f"chance_{key}", metrics.get("chance"))
            table.add_row(label if i == 0 else "", key + (" *" if key == primary else ""), f"{metrics[key]:.4f}",
                          "-" if chance is None else f"{chance:.4f}")
    for suite_name, error in report.errors.items():
        table.add_row(suite_name, "FAILED", "-", error[:200])
    console.out.print(table)


def print_side_by_side(reports) -> None:
    """Several models in one table: the primary metrics of the suites at least two of them ran
    (mmcore.eval.run.side_by_side; the tables of each model's report have the rest)."""
    from rich.table import Table

    from mmcore.eval.run import side_by_side

    columns, rows = side_by_side(reports, primary_only=True)
    if not rows:
        return
    table = Table(title=f"side by side on the suites they share (dataset {reports[0].dataset_id})")
    for column in ("suite", "metric", *columns):
        table.add_column(column, no_wrap=column in ("suite", "metric"))
    for suite_name, key, values in rows:
        table.add_row(suite_name, key, *("-" if v is None else f"{v:.4f}" for v in values))
    console.out.print(table)


def cmd_promote(args) -> int:
    from mmcore.config import GateConfig
    from mmcore.eval.gate import promote

    decision = promote(args.name, args.dataset, GateConfig(primary=args.primary, margin=args.margin), args.suite,
                       classes=args.classes)
    word = "PROMOTED" if decision.promoted else "REFUSED"
    console.out.print(f"{word}: {decision.model_name} v{decision.candidate_version} "
          f"(champion was {decision.champion_version or 'none'}): {decision.reason}")
    return 0 if decision.promoted else 3


def cmd_models_list(args) -> int:
    from rich.table import Table

    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig

    uri = tracking.resolve_uri(TrackingConfig())
    tracking.check_reachable(uri)
    table = Table(title=f"registered models in {uri}")
    columns = ("name", "version", "aliases", "stage", "dataset", "parent", "eval", "gate")
    for column in columns:
        table.add_column(column)
    for row in registry.registry_overview(uri):
        table.add_row(*(row[c] for c in columns))
    console.out.print(table)
    return 0


def cmd_models_lineage(args) -> int:
    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig

    uri = tracking.resolve_uri(TrackingConfig())
    tracking.check_reachable(uri)
    for link in registry.lineage(args.uri, uri):
        depth = link["depth"]
        details = {k: v for k, v in link.items() if k not in ("kind", "name", "depth") and v not in ("", None)}
        text = ", ".join(f"{k} {v}" for k, v in details.items())
        console.out.print(f"{'  ' * depth}{'└─ ' if depth else ''}{link['kind']} {link['name']}"
                          + (f" ({text})" if text else ""))
    return 0


def cmd_models_import(args) -> int:
    from mmcore.hub import import_model

    import_model(args.source, args.stage, args.revision, args.alias)
    return 0


def cmd_models_archs(args) -> int:
    from mmcore.models import list_models, model_config

    for name in list_models():
        console.out.print(f"{name:16} {model_config(name).get('description', '')}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The library's commands; the app (pipelines/cli.py) adds the orchestration ones to `commands`."""
    parser = argparse.ArgumentParser(prog="mmpipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"show the libraries' output (Ray, DeepSpeed, Prefect, MLflow) on the console too; "
                             f"otherwise it goes to <home>/logs/ (also {console.VERBOSE_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_corpus_commands(commands)
    _add_model_commands(commands)
    _add_infer_command(commands)
    _add_search_command(commands)

    dataset = commands.add_parser("dataset", help="inspect dataset versions").add_subparsers(dest="action",
                                                                                           required=True)
    show = dataset.add_parser("show", help="print a dataset version's summary")
    show.add_argument("dir")
    show.set_defaults(func=cmd_dataset_show)
    verify = dataset.add_parser("verify", help="check every file against the manifest")
    verify.add_argument("dir")
    verify.set_defaults(func=cmd_dataset_verify)
    kept = dataset.add_parser("filter", help="a new dataset version of the rows a registered model scores high "
                              "(DataComp's CLIP-score filtering)")
    kept.add_argument("dir")
    kept.add_argument("--model", help="the scoring model: models:/NAME@ALIAS or models:/NAME/VERSION")
    kept.add_argument("--by", choices=["clip-score", "semantic-duplicates", "random"], default="clip-score",
                      help="the model's CLIP score (default); its image embeddings, dropping each row within "
                           "--threshold cosine of an earlier kept one; or at random: a filter's baseline")
    kept.add_argument("--seed", type=int, default=0, help="--by random: the draw's seed (default %(default)s)")
    rule = kept.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=float, help="keep the rows scoring at least this")
    rule.add_argument("--top-fraction", type=float, help="keep this share of the rows, the best scored")
    kept.add_argument("--out", required=True, help="the new version's directory or s3:// prefix")
    kept.add_argument("--executor", choices=["ray", "here"], default="ray",
                      help="where the scores are computed when not stored yet (default %(default)s)")
    kept.set_defaults(func=cmd_dataset_filter)
    return parser, commands


def _add_corpus_commands(commands) -> None:
    """sample make / serve, ingest."""
    sample = commands.add_parser("sample", help="the sample corpus").add_subparsers(dest="action", required=True)
    make = sample.add_parser("make", help="write sample images, urls.parquet and conversations.jsonl")
    make.add_argument("dir")
    make.add_argument("--base-url", default=f"http://127.0.0.1:{DEMO_PORT}",
                      help="where `sample serve` will answer (default %(default)s)")
    make.add_argument("--synthetic", type=int, default=SampleSpec.synthetic,
                      help="synthetic scenes (default %(default)s)")
    make.add_argument("--digits", type=int, default=SampleSpec.digits, help="scikit-learn digits (default %(default)s)")
    make.add_argument("--no-photos", action="store_true", help="leave out the bundled photos and LFW subset")
    make.add_argument("--no-defects", action="store_true", help="leave out the planted bad rows")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--conversations", type=int, default=SampleSpec.conversations,
                      help="conversations about each image in conversations.jsonl, the corpus's questions as "
                           "instruction data (default %(default)s; 0: none)")
    make.add_argument("--noise", type=float, default=0.0, metavar="F",
                      help="the share F of the clean rows given a wrong caption, as web data has: half another "
                           "row's, half page boilerplate (caption_kind says which; default 0)")
    make.set_defaults(func=cmd_sample_make)
    serve = sample.add_parser("serve", help="serve a sample corpus over HTTP")
    serve.add_argument("dir")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    serve.add_argument("--port", type=int, default=DEMO_PORT, help="default %(default)s")
    serve.set_defaults(func=cmd_sample_serve)

    ing = commands.add_parser("ingest", help="URL list or conversation file -> filtered, versioned dataset")
    ing.add_argument("url_list", help="a .parquet, .csv or .jsonl URL list (or a directory of them); with --kind "
                                      "instructions, a LLaVA-format conversation file (.json or .jsonl)")
    ing.add_argument("--kind", choices=["captions", "instructions"], default="captions",
                     help="captions: image-text pairs (default); instructions: conversations about images")
    ing.add_argument("--images", metavar="ROOT",
                     help="--kind instructions: the directory (or s3://bucket/prefix) that the file's image paths "
                          "are relative to")
    ing.add_argument("--out", required=True, help="directory of the new dataset version (must not exist)")
    ing.add_argument("--format", choices=["parquet", "csv", "jsonl"], help="default: from the extension")
    ing.add_argument("--url-col", default="url")
    ing.add_argument("--caption-col", default="caption")
    ing.add_argument("--allow-network", action="append", metavar="CIDR",
                     help="let the guard reach this otherwise blocked network (repeatable), e.g. 127.0.0.1/32")
    ing.add_argument("--work-dir", help="downloads and resume state (default <out>.partial)")
    ing.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="override any IngestConfig field, e.g. download.image_size=128 (repeatable)")
    ing.set_defaults(func=cmd_ingest)


def _add_model_commands(commands) -> None:
    """train, models archs / list / lineage, evaluate, promote."""
    train = commands.add_parser("train", help="train a stage on a dataset version and register the model")
    train.add_argument("stage", choices=list(STAGES))
    train.add_argument("--recipe", help="a named RunConfig (mmcore/recipes.py); default: "
                       + ", ".join(f"{stage.recipe} for {name}" for name, stage in STAGES.items()))
    train.add_argument("--dataset", required=True, help="dataset version directory")
    train.add_argument("--ray-address", help="an existing Ray cluster (default: start a local Ray)")
    train.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override any RunConfig field, e.g. optim.max_steps=500 (repeatable)")
    train.set_defaults(func=cmd_train)

    models = commands.add_parser("models", help="architectures and registered models").add_subparsers(
        dest="action", required=True)
    archs = models.add_parser("archs", help="list the named architectures")
    archs.set_defaults(func=cmd_models_archs)
    listing = models.add_parser("list", help="registered models: versions, aliases, lineage, last evaluation")
    listing.set_defaults(func=cmd_models_list)
    imported = models.add_parser("import", help="register a Hugging Face checkpoint (a repo id or a local "
                                 "directory) as a version of a stage's model")
    imported.add_argument("source", help="a Hugging Face repo id (owner/name) or a local directory in that format")
    imported.add_argument("--stage", required=True, choices=list(BUNDLERS),
                          help="the stage whose model it becomes: language (a causal LM), contrastive (CLIP, SigLIP)")
    imported.add_argument("--revision", help="a branch, tag or commit of the repo (default: its main)")
    imported.add_argument("--alias", default="candidate", help="the alias the version gets (default %(default)s)")
    imported.set_defaults(func=cmd_models_import)
    chain = models.add_parser("lineage", help="a model's parents down to its dataset version and URL list")
    chain.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    chain.set_defaults(func=cmd_models_lineage)

    evaluate = commands.add_parser("evaluate", help="evaluate a registered model on a dataset version")
    evaluate.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--suite", action="append", help="a suite to run (repeatable; default: all that fit)")
    evaluate.add_argument("--classes", metavar="FILE", help=CLASSES_HELP)
    evaluate.set_defaults(func=cmd_evaluate)

    gate = commands.add_parser("promote", help="evaluate @candidate against @champion and promote on a clear win")
    gate.add_argument("name", help="registered model name, e.g. mmpipe-contrastive")
    gate.add_argument("--dataset", required=True)
    gate.add_argument("--suite", action="append", help="suites to compare on (default: all that fit)")
    gate.add_argument("--primary", default="", help="suite.metric (default: the stage's, retrieval."
                      "image_to_text_recall_5 for contrastive, vqa.accuracy for fusion)")
    gate.add_argument("--margin", type=float, default=0.0, help="required improvement (default %(default)s)")
    gate.add_argument("--classes", metavar="FILE", help=CLASSES_HELP)
    gate.set_defaults(func=cmd_promote)


def cmd_dataset_filter(args) -> int:
    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.scored import check_new, filter_by_score, random_subset, without_semantic_duplicates
    from mmcore.infer import infer

    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise ValueError(f"--top-fraction {args.top_fraction}: must be in (0, 1]")
    parent = DatasetVersion.open(args.dir)
    check_new(args.out)
    if args.by == "random":
        if args.top_fraction is None:
            raise ValueError("--by random keeps --top-fraction F of the rows, drawn at random (no --threshold)")
        total = parent.manifest["rows"]["kept"]
        print_summary(random_subset(parent, args.out, max(1, round(args.top_fraction * total)), args.seed))
        return 0
    if not args.model:
        raise ValueError(f"--by {args.by}: --model names the registered model that scores the rows")
    if args.by == "semantic-duplicates":
        if args.threshold is None:
            raise ValueError("--by semantic-duplicates needs --threshold: the cosine at which two images are one")
        derived, _ = infer(args.model, args.dir, "embeddings", args.executor)
        print_summary(without_semantic_duplicates(parent, derived, args.out, args.threshold))
        return 0
    derived, _ = infer(args.model, args.dir, args.by, args.executor)
    print_summary(filter_by_score(parent, derived, args.out, args.by.replace("-", "_"), args.threshold,
                                  args.top_fraction))
    return 0


def _add_infer_command(commands) -> None:
    from mmcore.infer import OUTPUTS

    infer = commands.add_parser("infer", help="run a registered model over every row of a dataset version, kept as "
                                "a derived version beside it")
    infer.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    infer.add_argument("--dataset", required=True)
    infer.add_argument("--output", required=True, choices=list(OUTPUTS),
                       help="embeddings (image and caption) or clip-score: a contrastive model; codes: an image "
                            "tokenizer; captions: a fusion or unified model")
    infer.add_argument("--executor", choices=["ray", "here"], default="ray",
                       help="Ray Data actors on the cluster (default), or this process")
    infer.add_argument("--ray-address", default="", help="a Ray cluster to join (default: $RAY_ADDRESS, else a "
                       "local Ray)")
    infer.set_defaults(func=cmd_infer)


def cmd_infer(args) -> int:
    import numpy as np
    from rich.table import Table

    from mmcore.infer import infer

    derived, seconds = infer(args.uri, args.dataset, args.output, args.executor, args.ray_address)
    m = derived.manifest
    rows = sum(s["rows"] for s in m["shards"])
    table = Table(title=f"{m['kind']} of dataset {m['dataset_id']} by {m['model']}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("rows", str(rows))
    table.add_row("shards", f"{derived.computed} computed, {len(m['shards']) - derived.computed} stored before"
                  + (f"; {rows / seconds:.0f} rows/s" if derived.computed == len(m["shards"]) else ""))
    table.add_row("columns", ", ".join(m["columns"]))
    table.add_row("size", f"{sum(s['bytes'] for s in m['shards']) / 1e6:.1f} MB")
    if m["kind"] == "clip-score":  # what a threshold or a top fraction would keep
        table.add_row("clip_score", ", ".join(f"p{q} {v:.3f}" for q, v in
                                               zip((10, 50, 90), np.percentile(derived.column("clip_score"),
                                                                               [10, 50, 90]))))
    table.add_row("path", str(derived.path))
    console.out.print(table)
    return 0


def _add_search_command(commands) -> None:
    search = commands.add_parser("search", help="the rows of a dataset version nearest to a text or an image, by a "
                                 "contrastive model's embeddings: a table and a contact sheet")
    search.add_argument("query", help="a text, or the path of an image file")
    search.add_argument("--dataset", required=True)
    search.add_argument("--model", default="models:/mmpipe-contrastive@champion",
                        help="the contrastive model that embeds (default models:/mmpipe-contrastive@champion); the "
                             "dataset's embeddings by it are computed the first time (mmpipe infer --output "
                             "embeddings)")
    search.add_argument("-k", "--k", type=int, default=8, help="rows to return (default 8)")
    search.add_argument("--out", help="the contact sheet's PNG (default <home>/search/<dataset id>-<query>.png)")
    search.add_argument("--executor", choices=["ray", "here"], default="ray",
                        help="where the embeddings are computed the first time: Ray Data actors (default), or "
                             "this process")
    search.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from rich.table import Table

    from mmcore.search import search

    result = search(args.query, args.dataset, args.model, args.k, args.executor, args.out)
    table = Table(title=f"{result.query!r} in dataset {result.dataset_id} by {result.model}")
    for name in ("rank", "score", "row", "split", "caption"):
        table.add_column(name, overflow="fold", no_wrap=name != "caption")
    for hit in result.hits:
        table.add_row(str(hit["rank"]), f"{hit['score']:.3f}", str(hit["row"]), hit["split"], hit["caption"])
    console.out.print(table)
    console.say(f"contact sheet: {result.sheet}")
    return 0


CLASSES_HELP = ('the zeroshot suite\'s classes: JSON {"column": "label", "classes": [...], '
                '"templates": ["a photo of a {}.", ...]}')


def home_of(args: argparse.Namespace) -> Path:
    """The project home a command works in: its --home if it has one, else $MMPIPE_HOME or ~/.mmpipe."""
    return Path(args.home).expanduser().absolute() if getattr(args, "home", None) else project_home()


def run(args: argparse.Namespace) -> int:
    """Run a parsed command with the console set up (library output to a log file unless -v).

    A failure is one message on stderr naming what failed and the log file with the details; exit
    status 2 for user errors (ValueError, OSError: bad config, missing or bad files), 1 otherwise.
    """
    console.configure(home_of(args) / "logs", args.command, verbose=args.verbose or console.verbose_from_env())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.err.print(f"mmpipe: {args.command} interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - one clear message; the traceback is in the log file
        console.err.print(console.failure(err, args.command))
        return 2 if isinstance(err, (ValueError, OSError)) else 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser()[0].parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
