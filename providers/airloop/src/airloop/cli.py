"""``airloop`` command: build the isolated runtimes, draft expectation suites, run the reference loop."""

from __future__ import annotations

import argparse
import sys

from airloop.steps.data.requests import ProfileRequest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airloop")
    commands = parser.add_subparsers(dest="command", required=True)

    runtimes = commands.add_parser("runtimes", help="isolated Python environments for steps")
    runtimes_cmd = runtimes.add_subparsers(dest="action", required=True)
    build = runtimes_cmd.add_parser("build", help="create or refresh runtimes with uv")
    build.add_argument("names", nargs="*", help="runtimes to build (default: all)")
    build.add_argument("--force", action="store_true", help="recreate the virtualenv")
    runtimes_cmd.add_parser("list", help="show runtimes and where they live")

    suites = commands.add_parser("suites", help="Great Expectations suites for the data gate")
    suites_cmd = suites.add_subparsers(dest="action", required=True)
    profile = suites_cmd.add_parser("profile", help="draft a suite from a trusted reference set, to review")
    profile.add_argument("data", help="the reference data: parquet or CSV, a path or an fsspec URL")
    profile.add_argument("--out", required=True, help="the suite file to write: .yaml/.yml or .json")
    profile.add_argument("--key", help="a column whose values must be unique")
    profile.add_argument("--label", help="the target column: no feature may (almost) predict it alone")
    profile.add_argument("--name", help="the suite's name (default: the file's name)")
    profile.add_argument(
        "--margin",
        type=float,
        default=ProfileRequest.margin,
        help="numeric ranges widened by this many times the observed span on each side",
    )
    profile.add_argument(
        "--mostly",
        type=float,
        default=ProfileRequest.mostly,
        help="the share of rows each range and value set must hold for",
    )
    for kind in ("categorical", "numeric"):
        profile.add_argument(
            f"--{kind}",
            action="append",
            metavar="COLUMN",
            help=f"a column to profile as {kind}, whatever its values suggest (repeatable)",
        )

    init = commands.add_parser(
        "init", help="draft a loop spec and its data suite from a data file, to review"
    )
    init.add_argument(
        "data", help="a table of the loop's training data: parquet or CSV, a path or an fsspec URL"
    )
    init.add_argument("--label", required=True, help="the column the model predicts")
    init.add_argument("--name", help="the loop's name (default: from the file's name)")
    init.add_argument(
        "--out", default="loops", help="the loops folder to write NAME.yaml and NAME.suite.json to"
    )
    init.add_argument("--key", help="a column that identifies a row (not a feature; unique)")
    init.add_argument("--timestamp", help="a column of event times (not a feature)")
    init.add_argument(
        "--categorical",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a feature to encode as a category though it is numeric, e.g. integer codes (repeatable)",
    )
    init.add_argument("--force", action="store_true", help="replace the spec and suite if they exist")

    loops = commands.add_parser("loops", help="loop specs")
    loops_cmd = loops.add_subparsers(dest="action", required=True)
    check = loops_cmd.add_parser("check", help="validate loop specs and build their DAGs, as Airflow will")
    check.add_argument("paths", nargs="+", help="spec files or folders of them")

    loop = commands.add_parser(
        "loop", help="run a loop end to end on the embedded default (the reference one)"
    )
    loop.add_argument("--dags", default="dags", help="folder of the reference DAGs")
    loop.add_argument("--spec", help="a loop spec to run instead of the reference loop (with --data)")
    loop.add_argument("--data", help="the spec's table, replayed: training drops and client traffic")
    loop.add_argument(
        "--shift-by", help="the rows of --data up to this column's median come before the shift"
    )
    loop.add_argument("--after", help="or: a second table, the rows after the shift")
    loop.add_argument("--rows", type=int, default=4000, help="rows per generated training set")
    loop.add_argument("--report", default=None, help="where to write the JSON report")
    loop.add_argument(
        "--label-share", type=float, default=1.0, help="share of the clients' answers whose true label comes"
    )
    loop.add_argument(
        "--label-delay", default="0", help="LOW-HIGH: seconds until a client's label comes (e.g. 2-30)"
    )
    loop.add_argument(
        "--keep-running",
        action="store_true",
        help="leave Airflow and the model servers running to browse the UI afterwards",
    )
    loop.add_argument(
        "--production",
        action="store_true",
        help="on the production topology, started on this machine: PostgreSQL, Redis, S3, an MLflow"
        " server, Airflow with the CeleryExecutor and two workers (see docs/deploy.md)",
    )

    args = parser.parse_args(argv)
    if args.command == "runtimes":
        from airloop import runtimes as rt

        if args.action == "list":
            for name in rt.available():
                print(f"{name}\t{rt.location(name)}")
            return 0
        for name in args.names or rt.available():
            print(f"building runtime {name!r} at {rt.build(name, force=args.force)}")
        return 0
    if args.command == "suites":
        from airloop.steps.data.profile import profile as profile_step

        made = profile_step(
            ProfileRequest(
                data_uri=args.data,
                out=args.out,
                key=args.key,
                label=args.label,
                name=args.name,
                margin=args.margin,
                mostly=args.mostly,
                categorical=args.categorical,
                numeric=args.numeric,
            )
        )
        table = [("column", "kind", "rule")] + [
            (c["column"], f"{c['kind']} ({c['why']})", c["rule"]) for c in made["columns"]
        ]
        widths = [max(len(row[i]) for row in table) for i in range(2)]
        for column, kind, rule in table:
            print(f"{column:<{widths[0]}}  {kind:<{widths[1]}}  {rule}")
        print(
            f"wrote suite {made['name']!r} ({made['expectations']} expectations, profiled from"
            f" {made['rows']} rows) to {made['suite_path']}: review it before it gates anything"
        )
        return 0
    if args.command == "init":
        from airloop.loops.init import draft

        try:
            drafted = draft(
                args.data,
                args.label,
                args.out,
                args.name,
                args.key,
                args.timestamp,
                declared=args.categorical,
                force=args.force,
            )
        except (ValueError, FileExistsError) as exc:
            print(f"airloop init: {exc}", file=sys.stderr)
            return 2
        print("\n".join(drafted.lines))
        return 0
    if args.command == "loops":
        return _check_loops(args.paths)
    world = None
    if args.spec or args.data:
        if not (args.spec and args.data):
            parser.error("--spec and --data go together: the loop spec, and the table to replay")
        from airloop.embedded.worlds import TableWorld
        from airloop.loops.spec import SpecError, load

        try:
            world = TableWorld(load(args.spec), args.data, shift_by=args.shift_by, after=args.after)
        except (SpecError, ValueError) as exc:
            print(f"airloop loop: {exc}", file=sys.stderr)
            return 2
    from airloop.embedded.runner import LabelLag
    from airloop.embedded.traffic import label_delay

    if not 0 < args.label_share <= 1:
        parser.error(f"--label-share must be more than 0 and at most 1, got {args.label_share}")
    try:
        labels = LabelLag(args.label_share, label_delay(args.label_delay))
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--label-delay: {exc}")
    if args.production:
        if args.keep_running:
            parser.error("--keep-running is for the embedded default; --production stops its services")
        from airloop.embedded import production

        return production.run(dags=args.dags, rows=args.rows, report=args.report, world=world, labels=labels)
    from airloop.embedded.runner import run_loop

    return run_loop(
        dags=args.dags,
        rows=args.rows,
        report=args.report,
        keep_running=args.keep_running,
        world=world,
        labels=labels,
    )


def _check_loops(paths: list[str]) -> int:
    from pathlib import Path

    from airloop.loops.dags import folder_dags, loop_dags
    from airloop.loops.spec import SpecError

    failed = False
    for path in paths:
        try:
            built = (
                folder_dags(path) if Path(path).is_dir() else dict.fromkeys(d.dag_id for d in loop_dags(path))
            )
        except (SpecError, OSError) as exc:
            print(exc, file=sys.stderr)
            failed = True
            continue
        print(f"{path}: ok, DAGs {', '.join(sorted(built)) or '(no spec)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
