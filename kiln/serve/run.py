"""`kiln serve`: load the models, open the conversation store, and run uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from kiln.errors import ConfigError
from kiln.serve.models import ModelRegistry, resolve_checkpoint


def serve(
    checkpoint: str,
    adapters: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    db: str | None = None,
    api_key: str | None = None,
    runs: str | None = None,
    max_batch: int = 8,
    queue: int = 32,
    device: str = "auto",
    threads: int | None = None,
    stream_interval_ms: float = 20.0,
) -> None:
    import uvicorn

    from kiln.device import physical_cores, pick_device, set_threads
    from kiln.serve.app import create_app
    from kiln.serve.store import ConversationStore

    if max_batch < 1 or queue < 0:
        raise ConfigError("--max-batch must be at least 1 and --queue at least 0")
    if stream_interval_ms < 0:
        raise ConfigError(f"--stream-interval {stream_interval_ms:g}: give milliseconds, 0 or more")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads} must be at least 1")
    # One core stays with the HTTP side (and, on a laptop, the clients): a decode step of a small model
    # is hundreds of tiny kernels that more threads only slow down once the cores are contended.
    set_threads(threads or max(1, physical_cores() - 1))
    # The decode thread and the event loop share one GIL, and every torch call hands it over: at the
    # default 5 ms switch interval each hand-over can stall a step for the length of the other's turn.
    sys.setswitchinterval(0.0005)
    folder = resolve_checkpoint(checkpoint)
    run_dir = folder.parent if folder.name in ("best", "last") else folder
    models = ModelRegistry(pick_device(device), slots=max_batch)
    models.load(folder, adapters)
    store = ConversationStore(Path(db) if db else run_dir / "chat.db")
    runs_dir = Path(runs) if runs else run_dir.parent
    app = create_app(models, queue, store, runs_dir, api_key, stream_interval=stream_interval_ms / 1000)
    names = ", ".join(f"{m['id']} ({m['kiln_role']})" for m in models.listing())
    shown = f"[{host}]" if ":" in host else host
    print(f"kiln serve: {names}; conversations in {store.path}")
    if not _is_loopback(host) and not api_key:
        print(
            f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model",
            file=sys.stderr,
        )
    print(f"serving on http://{shown}:{port} (the OpenAI API at http://{shown}:{port}/v1); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
