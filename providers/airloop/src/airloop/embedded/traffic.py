"""Simulated clients: call the gateway with rows from the current world, then send the true label.

Run as its own process (``python -m airloop.embedded.traffic``), as real clients would be. The world
is read from a control file, so the runner injects a shift without restarting the clients: the demo
world's ``{"shift": 0.0}`` (rows from ``airloop.embedded.demo``), or a table of the user's rows,
``{"shift": "after", "rows": PATH, "label": COLUMN}``, replayed in a random order (every column but the
label is a feature). Counts per (shift, model version) are written to a JSON stats file every second.

Labels come late, as in production (``--label-share``, ``--label-delay``): the true label of a share of
the answers is sent to the feedback endpoint after a random delay, the rest never comes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any


def _read_world(control: Path) -> dict[str, Any]:
    try:
        world = json.loads(control.read_text())
        return {**world, "shift": str(world["shift"])}
    except (OSError, ValueError, KeyError):
        return {"shift": "0.0"}


Row = tuple[list[str], list[Any], Any]


def _rows(world: dict[str, Any], seed: int) -> list[Row]:
    """The world's rows as (feature names, features, label), in a random order."""
    if "rows" in world:
        import pandas as pd

        frame = pd.read_parquet(world["rows"]).sample(frac=1.0, random_state=seed)
        label = world["label"]
    else:
        from airloop.embedded.demo import LABEL, generate

        frame, label = generate(2000, shift=float(world["shift"]), seed=seed), LABEL
    names = [str(c) for c in frame.columns if c != label]
    features = frame[names].astype(object).where(frame[names].notna(), None).values.tolist()
    return [(names, row, value) for row, value in zip(features, frame[label].tolist(), strict=True)]


async def run(
    endpoint: str,
    control: Path,
    stats_path: Path,
    concurrency: int,
    rate: float,
    seed: int,
    label_share: float = 1.0,
    label_delay: tuple[float, float] = (0.0, 0.0),
) -> None:
    import httpx

    from airloop.serving.model import label_value, predicted_class

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats: dict[str, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: {"requests": 0, "errors": 0, "correct": 0})
    )
    rng = random.Random(seed)
    pool: list[Row] = []
    pool_shift: list[str | None] = [None]

    def next_row() -> tuple[str, list[str], list[Any], Any]:
        world = _read_world(control)
        if world["shift"] != pool_shift[0] or not pool:
            pool[:] = _rows(world, rng.randrange(1 << 30))
            pool_shift[0] = world["shift"]
        names, features, label = pool.pop()
        return world["shift"], names, features, label

    pending: set[asyncio.Task[None]] = set()  # labels on their way: kept, or the loop may drop them

    async def send_label(http: httpx.AsyncClient, feedback: dict[str, Any], delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await http.post(f"{endpoint}/api/v1.0/feedback", json=feedback)
        except httpx.HTTPError:
            pass  # a label lost on the way, as some are

    async def client(http: httpx.AsyncClient) -> None:
        pause = concurrency / rate  # each client's share of the request rate
        while not stop.is_set():
            await asyncio.sleep(pause)
            shift, names, features, label = next_row()
            counts = None
            try:
                answer = await http.post(
                    f"{endpoint}/api/v1.0/predictions", json={"data": {"names": names, "ndarray": [features]}}
                )
                body = answer.json()
                version = str(
                    body.get("meta", {}).get("model_version")
                    or answer.headers.get("X-Airloop-Predictor", "?")
                )
                counts = stats[shift][version]
                counts["requests"] += 1
                if answer.status_code != 200:
                    counts["errors"] += 1
                    continue
                predicted = predicted_class(body["data"]["ndarray"][0], body["data"].get("names") or [])
                counts["correct"] += int(label_value(predicted) == label_value(label))
                if rng.random() < label_share:
                    feedback = {
                        "request": {"data": {"names": names, "ndarray": [features]}},
                        "response": {"meta": body.get("meta", {})},
                        "truth": {"data": {"ndarray": [[label]]}},
                    }
                    task = asyncio.create_task(send_label(http, feedback, rng.uniform(*label_delay)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                if counts is None:
                    stats[shift]["unreachable"]["errors"] += 1
                await asyncio.sleep(0.05)

    async def write_stats() -> None:
        while not stop.is_set():
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats))
            os.replace(tmp, stats_path)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    async with httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(write_stats(), *(client(http) for _ in range(concurrency)))
    stats_path.write_text(json.dumps(stats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--control", required=True, type=Path)
    parser.add_argument("--stats", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second, about")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--label-share", type=float, default=1.0, help="share of answers whose label comes")
    parser.add_argument(
        "--label-delay", type=label_delay, default=(0.0, 0.0), help="LOW-HIGH: seconds until a label comes"
    )
    args = parser.parse_args(argv)
    asyncio.run(
        run(
            args.endpoint,
            args.control,
            args.stats,
            args.concurrency,
            args.rate,
            args.seed,
            args.label_share,
            args.label_delay,
        )
    )


def label_delay(text: str) -> tuple[float, float]:
    """``LOW-HIGH`` (or one number) seconds, for argparse."""
    low, _, high = text.partition("-")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH seconds, e.g. 2-30, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH seconds, got {text!r}")
    return bounds


def read_stats(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    main()
