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

    loop = commands.add_parser("loop", help="run the reference loop on the embedded default")
    loop.add_argument("--dags", default="dags", help="folder of the reference DAGs")
    loop.add_argument("--rows", type=int, default=4000, help="rows per generated training set")
    loop.add_argument("--report", default=None, help="where to write the JSON report")
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
    if args.production:
        if args.keep_running:
            parser.error("--keep-running is for the embedded default; --production stops its services")
        from airloop.embedded import production

        return production.run(dags=args.dags, rows=args.rows, report=args.report)
    from airloop.embedded.runner import run_loop

    return run_loop(dags=args.dags, rows=args.rows, report=args.report, keep_running=args.keep_running)


if __name__ == "__main__":
    sys.exit(main())
