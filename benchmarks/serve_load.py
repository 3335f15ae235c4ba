"""Load on ``zimage-trt serve``: a concurrency sweep against servers on loopback, side by side.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --json out.json   # running
    python benchmarks/serve_load.py \\
        --launch batch1="--model tiny -w serve.yaml --max-batch 1" \\
        --launch batch4="--model tiny -w serve.yaml --max-batch 4" \\
        --launch ray4="--ray --replicas 1 --model tiny -w serve.yaml --max-batch 4" \\
        --levels 1,2,4,8,16 --duration 20 --json results/cpu-serve-load.json

For each concurrency level (``--levels``) and each server in turn — level 1 on every server,
then level 2 on every server, … so that the machine's noise falls on all of them alike — N client
threads each post ``/v1/images/generations`` back to back: first ``--warmup`` untimed requests
each, then for ``--duration`` seconds. Every request has a prompt and seed of its own (no prompt
cache hit flatters a server). A 429 is recorded and its client waits the Retry-After header
(at most ``RETRY_CAP`` seconds) before its next request.

Per cell: images/s (200s finished inside the window / the window), p50/p95/p99 and mean latency
of the 200s (the requests still in flight at the window's end are awaited and count in the
latencies, not in images/s), status counts, the 429 rate, other errors (the first message), and
the server's own batch-size histogram for the cell: ``GET /metrics`` before and after, the
cumulative ``zimage_trt_batch_size_bucket`` counts differenced into counts per size (bucket).
``zimage_trt_images_total`` is differenced too (``server_images``): the cell's 200s, when
nothing else uses the server.

``--launch LABEL="SERVE ARGS"`` starts ``python -m zimage_trt.cli serve SERVE ARGS --port 0``
in a session of its own, waits for ``/healthz`` 200 and sends it SIGTERM at the end (Ctrl-C and
errors too). Prints a markdown table; ``--json PATH`` also writes PATH.md and PATH.png (images/s
and p95 against clients), atomically, and never over an existing file without ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from zimage_trt import __version__
from zimage_trt.atomic import atomic_path, write_text
from zimage_trt.bench.report import PALETTE, _nice_step, _table
from zimage_trt.errors import EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_RUN

SCHEMA = "zimage-trt-serve-load/1"
API_KEY_VARIABLE = "ZIMAGE_TRT_API_KEY"
RETRY_CAP = 1.0  # seconds a client waits at most after a 429, whatever Retry-After says
METRICS_SETTLE = 3.0  # seconds /metrics may take to count our 200s (Ray: ≤ 1 s behind)
SUBJECTS = ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a paper crane")


class LoadError(Exception):
    """A server did not start or answer; the message says which and why."""


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """One server under load: where it listens and, when this script started it, how."""

    label: str
    url: str
    launch: list[str] | None = None
    health: dict[str, Any] | None = None
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def parse_launch(spec: str) -> tuple[str, list[str]]:
    """``LABEL=SERVE ARGS`` → (label, argument list); ValueError naming the problem."""
    label, sep, rest = spec.partition("=")
    label = label.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
        raise ValueError(
            f'--launch {spec!r}: expected LABEL="SERVE ARGS", e.g. '
            'batch4="--model tiny --max-batch 4" (LABEL: letters, digits, _ . + -)'
        )
    try:
        args = shlex.split(rest)
    except ValueError as exc:
        raise ValueError(f"--launch {spec!r}: {exc}") from None
    if not args:
        raise ValueError(f"--launch {spec!r}: no serve arguments after '='")
    return label, args


def _log_tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-chars:]


def start(label: str, args: list[str], folder: Path) -> Target:
    """``zimage-trt serve ARGS`` in a session of its own, its output in ``folder/LABEL.log``."""
    argv = [sys.executable, "-m", "zimage_trt.cli", "serve", *args]
    if not any(a == "--port" or a.startswith("--port=") for a in args):
        argv += ["--port", "0"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster on loopback, as the tests run it
    log = folder / f"{label}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Target(label, "", args, process=process, log=log)


def wait_ready(target: Target, timeout: float) -> None:
    """Wait for the launched server to say where it listens, then for ``/healthz`` 200;
    LoadError with the log's tail when it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    print(f"serve_load: waiting for {target.label} ({target.url or 'starting'})", file=sys.stderr)
    while time.monotonic() < deadline:
        if target.process is not None and target.process.poll() is not None:
            raise LoadError(
                f"server {target.label!r} exited with status {target.process.returncode} "
                f"before it was ready; its log ends:\n{_log_tail(target.log)}"
            )
        if not target.url:
            found = re.search(
                r"zimage-trt serve: listening on (http://\S+)", _log_tail(target.log, 1 << 20)
            )
            if found:
                target.url = found.group(1).replace("://0.0.0.0:", "://127.0.0.1:")
        if target.url:
            try:
                answer = httpx.get(f"{target.url}/healthz", timeout=5)
                if answer.status_code == 200:
                    target.health = answer.json()
                    return
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    where = target.url or "(no 'listening on' line yet)"
    tail = _log_tail(target.log)
    raise LoadError(
        f"server {target.label!r} at {where} was not ready within {timeout:g} s "
        f"(/healthz: {last})" + (f"; its log ends:\n{tail}" if tail else "")
    )


def check_key(target: Target, api_key: str | None) -> None:
    """LoadError when the server refuses our key (or the lack of one): every request would."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answer = httpx.get(f"{target.url}/v1/models", headers=headers, timeout=30)
    if answer.status_code == 401:
        what = "refuses the API key given" if api_key else "needs an API key"
        raise LoadError(f"server {target.label!r} at {target.url} {what}: pass --api-key KEY or "
                        f"set {API_KEY_VARIABLE}")  # fmt: skip


def stop(target: Target, grace: float = 90.0) -> None:
    """SIGTERM (the server drains and exits), SIGKILL to its session after ``grace`` seconds or
    for anything left behind."""
    process = target.process
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"serve_load: {target.label} ignored SIGTERM; killing it", file=sys.stderr)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its session: stragglers it started, if any
    process.wait()


@contextmanager
def servers(urls: Sequence[tuple[str, str]], launches: Sequence[tuple[str, list[str]]],
            start_timeout: float, api_key: str | None) -> Iterator[list[Target]]:  # fmt: skip
    """The servers to load, ready and taking our key: those given by URL and those launched
    here (stopped on the way out, whatever happens)."""
    targets = [Target(label, url.rstrip("/")) for label, url in urls]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder, ExitStack() as stack:
        for label, args in launches:
            target = start(label, args, Path(folder))
            stack.callback(stop, target)
            targets.append(target)
        for target in targets:
            wait_ready(target, start_timeout)
            check_key(target, api_key)
        yield targets


# -- one cell: N clients against one server --------------------------------------------------------
@dataclass
class Record:
    start: float
    end: float
    status: str  # "200", "429", …, or "error" (no HTTP answer)
    error: str | None = None
    waited: float = 0.0  # seconds slept after a 429


class Prompts:
    """A distinct prompt and seed per request, across the whole run (thread-safe)."""

    def __init__(self, size: str | None) -> None:
        self.size, self.i, self.lock = size, 0, threading.Lock()

    def next(self) -> dict[str, Any]:
        with self.lock:
            self.i += 1
            i = self.i
        body: dict[str, Any] = {"prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, study {i}", "seed": i}
        if self.size is not None:
            body["size"] = self.size
        return body


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def request(client: httpx.Client, body: dict[str, Any], timeout: float) -> Record:
    start = time.perf_counter()
    try:
        answer = client.post("/v1/images/generations", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        return Record(start, time.perf_counter(), "error", f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    record = Record(start, end, str(answer.status_code))
    if answer.status_code != 200:
        record.error = f"{answer.status_code}: {_message(answer)}"
    if answer.status_code == 429:
        try:
            record.waited = min(float(answer.headers.get("retry-after", RETRY_CAP)), RETRY_CAP)
        except ValueError:
            record.waited = RETRY_CAP
    return record


def client_loop(
    client: httpx.Client,
    prompts: Prompts,
    count: int | None,
    deadline: float,
    timeout: float,
    stopping: threading.Event,
    out: list[Record],
) -> None:
    """Requests back to back: ``count`` of them, or until ``deadline`` (perf_counter)."""
    while not stopping.is_set() and (
        len(out) < count if count is not None else time.perf_counter() < deadline
    ):
        record = request(client, prompts.next(), timeout)
        out.append(record)
        if record.waited:
            stopping.wait(record.waited)


def run_clients(
    clients: list[httpx.Client],
    prompts: Prompts,
    count: int | None,
    deadline: float,
    timeout: float,
) -> list[Record]:
    """Every client's loop on a thread of its own; all their records once all are done."""
    stopping = threading.Event()
    outs: list[list[Record]] = [[] for _ in clients]
    threads = [
        threading.Thread(
            target=client_loop,
            args=(c, prompts, count, deadline, timeout, stopping, out),
            daemon=True,
        )
        for c, out in zip(clients, outs, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stopping.set()  # Ctrl-C: no client starts another request
    return [r for out in outs for r in out]


@dataclass
class Snapshot:
    images: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative batches


def scrape(client: httpx.Client) -> Snapshot | None:
    """The server's image counter and batch-size buckets; None when /metrics does not answer."""
    try:
        answer = client.get("/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    snap = Snapshot()
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "zimage_trt_images_total":
                snap.images = sample.value
            elif sample.name == "zimage_trt_batch_size_bucket":
                snap.buckets[float(sample.labels["le"])] = sample.value
    return snap


def settled(client: httpx.Client, since: Snapshot | None, images: int) -> Snapshot | None:
    """/metrics once it counts ``images`` more images than ``since`` did, or after
    ``METRICS_SETTLE`` seconds: on Ray it sums the replicas' numbers, each up to a second old."""
    snap = scrape(client)
    deadline = time.monotonic() + METRICS_SETTLE
    while (since is not None and snap is not None and snap.images - since.images < images
           and time.monotonic() < deadline):  # fmt: skip
        time.sleep(0.2)
        snap = scrape(client)
    return snap


def batch_sizes(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """Batches run between two snapshots, per size: the exact size where the bucket holds one
    (1, 2, 3, 4), else the bucket's range ("5-6", "7-8", "9-12", "13-16", ">16")."""
    counts: dict[str, int] = {}
    below_bound, below_count = 0.0, 0.0
    for bound in sorted(after.buckets):
        cumulative = after.buckets[bound] - before.buckets.get(bound, 0.0)
        n = round(cumulative - below_count)
        if n:
            if math.isinf(bound):
                name = f">{below_bound:g}"
            elif bound - below_bound == 1:
                name = f"{bound:g}"
            else:
                name = f"{below_bound + 1:g}-{bound:g}"
            counts[name] = n
        below_bound, below_count = bound, cumulative
    return counts


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), ``ordered`` sorted."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(records: list[Record], window_end: float, seconds: float) -> dict[str, Any]:
    ok = sorted(r.end - r.start for r in records if r.status == "200")
    in_window = sum(1 for r in records if r.status == "200" and r.end <= window_end)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    failed = [r for r in records if r.status not in ("200", "429")]
    latency = None
    if ok:
        latency = {
            "p50": percentile(ok, 0.5),
            "p95": percentile(ok, 0.95),
            "p99": percentile(ok, 0.99),
            "mean": sum(ok) / len(ok),
        }
    return {
        "requests": len(records),
        "ok": len(ok),
        "ok_in_window": in_window,
        "images_per_s": in_window / seconds,
        "latency_s": latency,
        "status_counts": dict(sorted(statuses.items())),
        "rate_429": statuses.get("429", 0) / len(records) if records else 0.0,
        "retry_wait_s": sum(r.waited for r in records),
        "errors": {"count": len(failed), "first": failed[0].error if failed else None},
    }


def run_cell(target: Target, n: int, opts: argparse.Namespace, prompts: Prompts) -> dict[str, Any]:
    """``n`` clients on ``target``: warm-up, then ``opts.duration`` seconds of load."""
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with ExitStack() as stack:
        clients = [
            stack.enter_context(httpx.Client(base_url=target.url, headers=headers, limits=limits))
            for _ in range(n)
        ]
        base = scrape(clients[0])
        warm = run_clients(clients, prompts, opts.warmup, math.inf, opts.timeout)
        warm_ok = sum(1 for r in warm if r.status == "200")
        before = settled(clients[0], base, warm_ok)
        start = time.perf_counter()
        window_end = start + opts.duration
        records = run_clients(clients, prompts, None, window_end, opts.timeout)
        drained = time.perf_counter()
        cell = {
            "server": target.label,
            "clients": n,
            "seconds": opts.duration,
            **summarize(records, window_end, opts.duration),
            "drain_s": max(0.0, drained - window_end),
            "warmup": {"requests": len(warm), "ok": warm_ok},
        }
        after = settled(clients[0], before, cell["ok"])
    if before is None or after is None:
        cell["batch_sizes"], cell["server_images"] = None, None
    else:
        cell["batch_sizes"] = batch_sizes(before, after)
        cell["server_images"] = round(after.images - before.images)
    return cell


# -- the report ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """The client machine without naming it (the servers here run on it too)."""
    from zimage_trt.bench.run import _cpu_name

    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            gpus = [line.strip() for line in listed.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
    }


def _p95(cell: dict[str, Any]) -> float | None:
    return None if cell["latency_s"] is None else float(cell["latency_s"]["p95"])


def comparisons(
    labels: list[str], cells: list[dict[str, Any]], budget: float | None
) -> dict[str, Any]:
    """Per pair of servers (b / a, a listed first): images/s ratio per level, and the ratio of
    the best images/s each reaches with p95 ≤ the budget (default: the median p95 of the first
    server's cells)."""
    by = {(c["server"], c["clients"]): c for c in cells}
    if budget is None:
        first = sorted(p for c in cells if c["server"] == labels[0] and (p := _p95(c)) is not None)
        budget = percentile(first, 0.5) if first else None
    best: dict[str, dict[str, Any] | None] = {}
    for label in labels:
        fits = [
            c
            for c in cells
            if c["server"] == label
            and (p := _p95(c)) is not None
            and budget is not None
            and p <= budget
        ]
        top = max(fits, key=lambda c: c["images_per_s"], default=None)
        best[label] = (
            None
            if top is None
            else {"images_per_s": top["images_per_s"], "clients": top["clients"]}
        )

    def ratio(b: float | None, a: float | None) -> float | None:
        return None if a is None or b is None or a == 0 else b / a

    levels = sorted({c["clients"] for c in cells})
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            per_level = {
                str(n): ratio(by[b, n]["images_per_s"], by[a, n]["images_per_s"])
                for n in levels
                if (a, n) in by and (b, n) in by
            }
            ba, bb = best[a], best[b]
            at_budget = (
                None if ba is None or bb is None else ratio(bb["images_per_s"], ba["images_per_s"])
            )
            pairs.append(
                {"a": a, "b": b, "throughput_ratio": per_level, "ratio_at_equal_p95": at_budget}
            )
    return {"p95_budget_s": budget, "best_within_budget": best, "pairs": pairs}


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _clients(n: int) -> str:
    return f"{n} client" + ("s" if n != 1 else "")


def histogram_text(sizes: dict[str, int] | None) -> str:
    return "–" if sizes is None else (" ".join(f"{k}:{v}" for k, v in sizes.items()) or "none")


HEADER = (
    "clients",
    "server",
    "images/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "mean ms",
    "200",
    "429 %",
    "errors",
    "batch sizes",
)


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    where = ", ".join(m["gpus"]) or f"{m['cpu']} ({m['cpu_count']} cores)"
    lines = [
        "# zimage-trt serve load: " + " vs ".join(result["servers"]),
        "",
        f"{where}; {s['duration']:g} s per cell after {s['warmup']} warm-up request(s) per "
        f"client; size {s['size'] or 'as served'}; {result['created']}.",
        "",
    ]
    for label, server in result["servers"].items():
        how = f"`serve {shlex.join(server['launch'])}`" if server["launch"] else "given by URL"
        health = server["health"] or {}
        facts = ", ".join(f"{k} {v}" for k, v in health.items() if k != "status")
        lines.append(f"- {label}: {server['url']}, {how}; {facts}")
    rows = []
    for c in result["cells"]:
        lat = c["latency_s"] or {}
        rows.append(
            (
                c["clients"],
                c["server"],
                f"{c['images_per_s']:.3g}",
                _ms(lat.get("p50")),
                _ms(lat.get("p95")),
                _ms(lat.get("p99")),
                _ms(lat.get("mean")),
                c["ok"],
                f"{100 * c['rate_429']:.1f}",
                c["errors"]["count"],
                histogram_text(c["batch_sizes"]),
            )
        )
    lines += ["", *_table(HEADER, rows)]
    comp = result["comparisons"]
    budget = comp["p95_budget_s"]
    for pair in comp["pairs"]:
        levels = ", ".join(
            f"{_clients(int(n))} {_x(r)}" for n, r in pair["throughput_ratio"].items()
        )
        lines.append(f"- images/s, {pair['b']} / {pair['a']}: {levels}")
    if budget is not None:
        best = "; ".join(
            f"{label} "
            + ("none" if b is None else f"{b['images_per_s']:.3g} ({_clients(b['clients'])})")
            for label, b in comp["best_within_budget"].items()
        )
        lines.append(f"- best images/s with p95 ≤ {_ms(budget)} ms: {best}")
        for pair in comp["pairs"]:
            lines.append(
                f"- at equal p95, {pair['b']} / {pair['a']}: {_x(pair['ratio_at_equal_p95'])}"
            )
    for c in result["cells"]:
        if c["errors"]["count"]:
            lines.append(
                f"- {c['server']}, {_clients(c['clients'])}: {c['errors']['count']} "
                f"errors, the first: {c['errors']['first']}"
            )
    return "\n".join([*lines, ""])


PANEL_W, PANEL_H, PANEL_LEFT, TOP, BOTTOM, GAP = 440, 260, 60, 40, 44, 30
LEGEND_ROW, LEGEND_PER_ROW, LEGEND_W = 22, 5, 180


def chart_size(servers: int) -> tuple[int, int]:
    """(width, height) of the chart for this many servers (legend entries)."""
    rows = -(-servers // LEGEND_PER_ROW)
    return 2 * (PANEL_LEFT + PANEL_W) + GAP + 10, TOP + PANEL_H + BOTTOM + rows * LEGEND_ROW + 12


def _panel(
    draw: Any,
    font: Any,
    left: int,
    title: str,
    levels: list[int],
    series: list[tuple[str, list[float | None]]],
) -> None:
    """One line chart: ``series`` (color, a value per level) over levels spaced evenly."""
    x0, y0, x1, y1 = left + PANEL_LEFT, TOP, left + PANEL_LEFT + PANEL_W, TOP + PANEL_H
    draw.text((x0, 14), title, fill="black", font=font)
    top = max((v for _, vs in series for v in vs if v is not None), default=0.0) or 1.0
    step = _nice_step(top)
    top = step * math.ceil(top / step)
    for i in range(round(top / step) + 1):
        y = y1 - i * step * (y1 - y0) / top
        draw.line((x0, y, x1, y), fill="#dddddd")
        text = f"{round(i * step, 9):g}"
        draw.text((x0 - 6 - draw.textlength(text, font=font), y - 5), text, fill="black", font=font)
    xs = [x0 + (k + 0.5) * (x1 - x0) / len(levels) for k in range(len(levels))]
    draw.line((x0, y0, x0, y1), fill="black")
    draw.line((x0, y1, x1, y1), fill="black")
    for x, n in zip(xs, levels, strict=True):
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text(
            (x - draw.textlength(str(n), font=font) / 2, y1 + 8), str(n), fill="black", font=font
        )
    label = "clients"
    draw.text(
        ((x0 + x1 - draw.textlength(label, font=font)) / 2, y1 + 24), label, fill="black", font=font
    )
    for color, values in series:
        points = [
            (x, y1 - v * (y1 - y0) / top) for x, v in zip(xs, values, strict=True) if v is not None
        ]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)


def draw_chart(result: dict[str, Any], path: str | Path) -> tuple[int, int]:
    """images/s and p95 seconds against clients, a line per server; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    labels = list(result["servers"])
    levels = sorted({c["clients"] for c in result["cells"]})
    by = {(c["server"], c["clients"]): c for c in result["cells"]}
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    size = chart_size(len(labels))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def values(label: str, pick: Any) -> list[float | None]:
        return [pick(by[label, n]) if (label, n) in by else None for n in levels]

    throughput = [(colors[b], values(b, lambda c: c["images_per_s"])) for b in labels]
    p95 = [(colors[b], values(b, _p95)) for b in labels]
    _panel(draw, font, 0, "images/s", levels, throughput)
    _panel(draw, font, PANEL_LEFT + PANEL_W + GAP, "p95 latency, s", levels, p95)
    y = TOP + PANEL_H + BOTTOM
    for i, label in enumerate(labels):
        row, col = divmod(i, LEGEND_PER_ROW)
        lx, ly = PANEL_LEFT + col * LEGEND_W, y + row * LEGEND_ROW
        draw.line((lx, ly + 7, lx + 18, ly + 7), fill=colors[label], width=3)
        draw.text((lx + 24, ly + 2), label, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return size


# -- the command -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_load.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A concurrency sweep against zimage-trt servers, side by side: images/s, "
        "p50/p95/p99 latency, 429 rate and the servers' batch sizes per (clients, server) cell.",
        epilog="example:\n  python benchmarks/serve_load.py --levels 1,4 --duration 8 "
        '--launch batch1="--model tiny --max-batch 1" --launch batch4="--model tiny '
        '--max-batch 4" --json /tmp/load.json',
    )
    add = p.add_argument
    add("--url", action="append", default=[], help="a running server (repeatable)")
    add("--label", action="append", default=[], help="a name per --url (default: host:port)")
    add("--launch", action="append", default=[], metavar='LABEL="ARGS"',
        help="start 'zimage-trt serve ARGS --port 0' here (repeatable)")  # fmt: skip
    add("--levels", default="1,2,4,8,16", help="client counts (default 1,2,4,8,16)")
    add("--duration", type=float, default=20.0, metavar="S", help="timed s per cell (default 20)")
    add("--warmup", type=int, default=1, metavar="N", help="untimed requests per client (def. 1)")
    add("--timeout", type=float, default=300.0, metavar="S", help="s per request (default 300)")
    add("--size", default=None, help="WxH of every request (default: the served workflow's)")
    add("--api-key", default=os.environ.get(API_KEY_VARIABLE) or None,
        help=f"sent as a Bearer token (default: ${API_KEY_VARIABLE})")  # fmt: skip
    add("--p95-budget", type=float, default=None, metavar="S",
        help="the at-equal-p95 budget (default: median p95 of the first server)")  # fmt: skip
    add("--start-timeout", type=float, default=300.0, metavar="S",
        help="s a server may take to answer /healthz 200 (default 300)")  # fmt: skip
    add("--json", type=Path, default=None, metavar="PATH", help="write every figure")
    add("--md", type=Path, default=None, metavar="PATH", help="the table (default: beside --json)")
    add("--png", type=Path, default=None, metavar="PATH", help="the chart (default: beside --json)")
    add("--force", action="store_true", help="overwrite existing output files")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """The levels; usage errors for everything else that is wrong."""
    if not args.url and not args.launch:
        p.error('nothing to load: give --url URL (a running server) or --launch LABEL="ARGS"')
    if len(args.label) > len(args.url):
        p.error(f"{len(args.label)} --label for {len(args.url)} --url")
    try:
        levels = [int(v) for v in args.levels.split(",")]
    except ValueError:
        p.error(f"--levels {args.levels!r}: expected comma-separated client counts, e.g. 1,2,4")
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        p.error(f"--levels {args.levels!r}: distinct client counts ≥ 1")
    if not args.duration > 0 or args.warmup < 0 or not args.timeout > 0:
        p.error("--duration and --timeout must be > 0, --warmup ≥ 0")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    levels = _check(parser, args)
    try:
        launches = [parse_launch(spec) for spec in args.launch]
    except ValueError as exc:
        parser.error(str(exc))
    urls = [
        (args.label[i] if i < len(args.label) else httpx.URL(u).netloc.decode(), u)
        for i, u in enumerate(args.url)
    ]
    labels = [label for label, _ in urls] + [label for label, _ in launches]
    if len(set(labels)) != len(labels):
        parser.error(f"server labels must differ: {', '.join(labels)} (name them: --label)")
    md, png = args.md, args.png
    if args.json is not None:
        md, png = md or args.json.with_suffix(".md"), png or args.json.with_suffix(".png")
    outputs = [p for p in (args.json, md, png) if p is not None]
    for path in outputs:
        if path.exists() and not args.force:
            print(
                f"serve_load: {path} exists; not overwritten (pass --force, or another --json)",
                file=sys.stderr,
            )
            return EXIT_OUTPUT
    settings = {
        "levels": levels,
        "duration": args.duration,
        "warmup": args.warmup,
        "timeout": args.timeout,
        "size": args.size,
        "api_key": bool(args.api_key),
        "p95_budget": args.p95_budget,
        "retry_cap_s": RETRY_CAP,
    }
    prompts = Prompts(args.size)
    cells: list[dict[str, Any]] = []
    try:
        with servers(urls, launches, args.start_timeout, args.api_key) as targets:
            for n in levels:
                for target in targets:  # interleaved: the machine's noise hits every server
                    cell = run_cell(target, n, args, prompts)
                    cells.append(cell)
                    p95 = _ms(_p95(cell))
                    print(
                        f"[{target.label}] {_clients(n)}: {cell['images_per_s']:.3g} images/s, "
                        f"p95 {p95} ms, {cell['ok']} ok, 429 {100 * cell['rate_429']:.1f} %, "
                        f"errors {cell['errors']['count']}, batches "
                        f"{histogram_text(cell['batch_sizes'])}",
                        file=sys.stderr,
                        flush=True,
                    )
            served = {
                t.label: {"url": t.url, "launch": t.launch, "health": t.health} for t in targets
            }
    except LoadError as exc:
        print(f"serve_load: {exc}", file=sys.stderr)
        return EXIT_RUN
    except KeyboardInterrupt:
        print("serve_load: interrupted; the servers started here were stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "zimage_trt": __version__,
        "machine": machine(),
        "settings": settings,
        "servers": served,
        "cells": cells,
        "comparisons": comparisons(labels, cells, args.p95_budget),
    }
    text = markdown(result)
    if args.json is not None:
        write_text(args.json, json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))
    if md is not None:
        write_text(md, text)
    if png is not None:
        draw_chart(result, png)
    print(text)
    for path in outputs:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
