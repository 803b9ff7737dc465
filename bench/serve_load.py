"""`kiln serve` under load: 1, 4 and 8 concurrent streaming clients against one live server process.

The bench starts `python -m kiln serve CHECKPOINT` on a free localhost port (without `--checkpoint` it
first trains the demo's model, `shakespeare-cpu` on Tiny Shakespeare's characters, for `--train-time`),
waits for `/health`, warms the server up, then for each level starts that many clients with the real
`openai.AsyncOpenAI`. Each client sends `--requests` streamed completions in a row (a fixed prompt,
`max_tokens` tokens, temperature 0.8, its own seed per request) and counts tokens from the final usage
chunk (`stream_options.include_usage`); the server clamps `max_tokens` to the model's context (the
demo model's is 64 characters, so a 7-character prompt leaves 57). Measured per level: aggregate
completion tokens/s over the level's wall time, time to first token (p50, p95 over all its requests),
each client's own tokens/s, and the CPU the clients themselves used (this process's CPU time over the
wall time: they run on the same cores as the server, as a user's would on a laptop, so on a small
machine they take a share the server would otherwise have). The levels take turns `--rounds` times, so
the machine's drift falls on all of them; figures are means.

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/serve_load.py                  # trains 60s first
    .venv/bin/python bench/serve_load.py --checkpoint runs/demo/shakespeare-cpu-.../best --json load.json
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000    # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\n"
BAR, GOAL = 3.0, 5.0  # 8 clients' aggregate tokens/s over one client's


@dataclass
class Request:
    ttft_s: float
    tokens: int
    seconds: float
    finish_reason: str


@dataclass
class Level:
    clients: int
    aggregate_tok_s: float
    per_client_tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    client_cpu: float  # this process's CPU seconds per wall second: 1.0 is one core
    requests: int
    tokens_per_request: float  # below max_tokens when the server clamps it to the model's context
    stopped_early: int  # requests that ended on an end-of-text token rather than at their length


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_demo_model(out: Path, seconds: str) -> Path:
    """Train the demo's preset on Tiny Shakespeare's characters, as `kiln demo` does; return the run folder."""
    from kiln.demo import DEMO_PRESET

    command = [sys.executable, "-m", "kiln", "train", "--data", "tinyshakespeare", "--tokenizer", "char"]
    command += ["--preset", DEMO_PRESET, "--max-time", seconds, "--out", str(out)]
    print(f"training {DEMO_PRESET} for {seconds}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "KILN_QUIET": "1"}, cwd=REPO)
    return out


@contextmanager
def live_server(checkpoint: Path, serve_args: list[str], log: Path, timeout_s: float = 180.0):
    """Run `kiln serve` on a free port until the block ends (also on Ctrl-C or an error); yield its URL."""
    port = free_port()
    command = [sys.executable, "-m", "kiln", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    command += serve_args
    with log.open("wb") as sink:
        # Its own session: Ctrl-C reaches only the bench, which then stops the server itself.
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, server, log, timeout_s)
        if url not in log.read_text(errors="replace"):
            print(f"note: the server did not print {url} before answering /health", flush=True)
        yield url
    finally:
        stop(server)


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kiln serve exited with {server.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"kiln serve did not answer {url}/health in {timeout_s:.0f}s; its log is {log}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


async def one_request(client: AsyncOpenAI, model: str, max_tokens: int, seed: int) -> Request:
    """One streamed completion; time to the first chunk with text, and the tokens the usage chunk counts."""
    start = time.perf_counter()
    ttft, tokens, chunks, finish_reason = None, None, 0, None
    stream = await client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            ttft = time.perf_counter() - start if ttft is None else ttft
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    seconds = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError(f"request with seed {seed} streamed no text")
    return Request(ttft, chunks if tokens is None else tokens, seconds, finish_reason or "none")


async def one_client(client: AsyncOpenAI, model: str, requests: int, max_tokens: int, seed: int) -> list[Request]:
    return [await one_request(client, model, max_tokens, seed + i) for i in range(requests)]


async def run_level(client: AsyncOpenAI, model: str, clients: int, requests: int, max_tokens: int) -> Level:
    start, cpu_start = time.perf_counter(), time.process_time()
    per_client = await asyncio.gather(
        *(one_client(client, model, requests, max_tokens, seed=1000 * c) for c in range(clients))
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    done = [r for client_requests in per_client for r in client_requests]
    ttfts = sorted(r.ttft_s for r in done)
    return Level(
        clients=clients,
        aggregate_tok_s=sum(r.tokens for r in done) / wall,
        per_client_tok_s=statistics.mean(sum(r.tokens for r in rs) / sum(r.seconds for r in rs) for rs in per_client),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        client_cpu=cpu / wall,
        requests=len(done),
        tokens_per_request=statistics.mean(r.tokens for r in done),
        stopped_early=sum(r.finish_reason != "length" for r in done),
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as numpy.percentile does by default."""
    rank = (len(sorted_values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def mean_level(rounds: list[Level]) -> Level:
    first = rounds[0]
    return Level(
        clients=first.clients,
        aggregate_tok_s=statistics.mean(r.aggregate_tok_s for r in rounds),
        per_client_tok_s=statistics.mean(r.per_client_tok_s for r in rounds),
        ttft_p50_s=statistics.mean(r.ttft_p50_s for r in rounds),
        ttft_p95_s=statistics.mean(r.ttft_p95_s for r in rounds),
        client_cpu=statistics.mean(r.client_cpu for r in rounds),
        requests=sum(r.requests for r in rounds),
        tokens_per_request=statistics.mean(r.tokens_per_request for r in rounds),
        stopped_early=sum(r.stopped_early for r in rounds),
    )


async def measure(url: str, levels: list[int], requests: int, max_tokens: int, rounds: int) -> tuple[str, list[Level]]:
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0) as client:
        model = (await client.models.list()).data[0].id
        print(f"model {model}: warming up", flush=True)
        await run_level(client, model, 1, 1, max_tokens)
        await run_level(client, model, max(levels), 1, max_tokens)
        measured: dict[int, list[Level]] = {n: [] for n in levels}
        for turn in range(rounds):
            for n in levels:
                level = await run_level(client, model, n, requests, max_tokens)
                print(f"round {turn + 1}: {n} clients, {level.aggregate_tok_s:,.0f} tok/s", flush=True)
                measured[n].append(level)
    return model, [mean_level(measured[n]) for n in levels]


def print_table(levels: list[Level], max_tokens: int) -> float | None:
    base = levels[0].aggregate_tok_s
    columns = ["clients", "aggregate tok/s", "ratio to 1 client", "p50 TTFT (ms)", "p95 TTFT (ms)"]
    columns += ["per-client tok/s", "client CPU"]
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for level in levels:
        print(
            f"| {level.clients} | {level.aggregate_tok_s:,.0f} | {level.aggregate_tok_s / base:.2f}x "
            f"| {level.ttft_p50_s * 1000:,.0f} | {level.ttft_p95_s * 1000:,.0f} | {level.per_client_tok_s:,.0f} "
            f"| {level.client_cpu:.0%} |"
        )
    tokens = statistics.mean(level.tokens_per_request for level in levels)
    stopped = sum(level.stopped_early for level in levels)
    print(f"\n{tokens:.0f} completion tokens per request on average (max_tokens {max_tokens})", end="")
    print("; the server clamps max_tokens to the model's context" if tokens < max_tokens and not stopped else "")
    if stopped:
        print(f"note: {stopped} requests ended on an end-of-text token; rates count the tokens they did stream")
    by_clients = {level.clients: level for level in levels}
    if levels[0].clients != 1 or 8 not in by_clients:
        return None
    ratio = by_clients[8].aggregate_tok_s / base
    verdict = "meets" if ratio >= BAR else "misses"
    print(f"\nbar: 8 clients at {ratio:.2f}x one client's aggregate tok/s {verdict} {BAR:g}x (goal {GOAL:g}x)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="run, checkpoint or adapter folder to serve")
    source.add_argument("--url", help="measure a server already running at this address instead of starting one")
    parser.add_argument("--train-time", default="60s", help="without --checkpoint, train the demo model this long")
    parser.add_argument("--clients", default="1,4,8", help="concurrency levels, comma-separated (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=4, help="requests each client sends in a row (default 4)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="turns each level takes (default 2)")
    parser.add_argument("--max-batch", type=int, default=8, help="kiln serve --max-batch (default 8)")
    parser.add_argument("--device", default="cpu", help="kiln serve --device (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="kiln-serve-load-") as tmp:
        if args.url:
            model, measured = asyncio.run(measure(args.url, levels, args.requests, args.max_tokens, args.rounds))
        else:
            checkpoint = args.checkpoint or train_demo_model(Path(tmp) / "run", args.train_time)
            serve_args = ["--device", args.device, "--max-batch", str(args.max_batch), "--db", f"{tmp}/chat.db"]
            with live_server(checkpoint, serve_args, Path(tmp) / "serve.log") as url:
                model, measured = asyncio.run(measure(url, levels, args.requests, args.max_tokens, args.rounds))
    ratio = print_table(measured, args.max_tokens)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        figures = {
            "model": model,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
            "levels": [asdict(level) for level in measured],
            "ratio_8_to_1": ratio,
            "bar": BAR,
            "goal": GOAL,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
