"""The queue in front of the models, and the one thread that runs them: each request takes a KV-cache
slot, is prefilled alone, then decodes one token per step together with every other request on the
same engine (llama.cpp's server slots). A request whose client has gone is dropped before the next step.
New text reaches the clients at most every `stream_interval` seconds (the first token at once): a small
model decodes hundreds of tokens a second per client, and framing each as its own event would cost the
server more CPU than decoding it.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kiln.generate.known_words import WordGuard
from kiln.generate.sampling import SamplingConfig, TextStream, draw, process_logits, word_guard
from kiln.serve.auth import APIError
from kiln.serve.models import Engine, ModelRegistry, ServedModel


@dataclass
class Job:
    """One request: what to generate, and a queue of events for the client: ("text", piece) as text
    becomes ready, then ("end", finish_reason) or ("error", message)."""

    model: ServedModel
    prompt: list[int]
    sampling: SamplingConfig
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    # The worker's own state, once the job holds a slot.
    slot: int = -1
    position: int = 0  # how many positions its slot holds
    pending: int = 0  # the token to feed at the next step
    history: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    guard: WordGuard | None = None  # with known_words, for a model that keeps its words

    def cancel(self) -> None:
        """The client has gone: the worker frees the slot before its next step."""
        self.cancelled = True


class Scheduler:
    """Admits queued jobs into free slots and steps every active job, on one background thread.
    At most `queue_size` jobs wait for a slot; one more is refused with 503. Text is handed to the
    clients at most every `stream_interval` seconds (0: after every step)."""

    def __init__(self, registry: ModelRegistry, queue_size: int = 32, stream_interval: float = 0.02):
        self.registry, self.queue_size, self.stream_interval = registry, queue_size, stream_interval
        self._flushed = 0.0  # when events were last handed over
        self._waiting: deque[Job] = deque()
        self._active: dict[Engine, list[Job]] = {}
        self._free: dict[Engine, list[int]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.decoded = 0  # tokens generated since the start, for /health
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple[str, str]]]] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiln-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._waiting) >= self.queue_size:
                raise APIError(
                    503, f"the server is busy: {len(self._waiting)} requests are waiting already; retry shortly"
                )
            self._waiting.append(job)
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            active = sum(len(jobs) for jobs in self._active.values())
            return {"waiting": len(self._waiting), "active": active, "decoded_tokens": self.decoded}

    def wake(self) -> None:
        """Look again: a waiting job was cancelled, so its place in the queue can go."""
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not any(self._active.values()):
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._admit()
            for job in admitted:
                self._guarded(self._prefill, job.model.engine, [job])
                self._flush()  # its first token now, not after the others' step
            for engine, jobs in list(self._active.items()):
                self._release([job for job in jobs if job.cancelled])
                if jobs:
                    self._guarded(self._step, engine, jobs)
            if not any(self._active.values()) or time.monotonic() - self._flushed >= self.stream_interval:
                self._flush()

    def _admit(self) -> list[Job]:
        """Move waiting jobs (oldest first) into free slots of their engines; drop cancelled ones."""
        admitted, still_waiting = [], deque()
        for job in self._waiting:
            if job.cancelled:
                continue
            engine = job.model.engine
            free = self._free.setdefault(engine, list(range(engine.slots)))
            if not free:
                still_waiting.append(job)
                continue
            job.slot = free.pop(0)
            self._active.setdefault(engine, []).append(job)
            admitted.append(job)
        self._waiting = still_waiting
        return admitted

    def _guarded(self, work, engine: Engine, jobs: list[Job]) -> None:
        """Run `work`; a failure ends just these jobs with an error event, and the server goes on."""
        try:
            work(engine, jobs)
        except Exception as e:  # noqa: BLE001 (whatever failed, the clients hear of it and others go on)
            for job in jobs:
                self._send(job, ("error", f"generation failed: {type(e).__name__}: {e}"))
            self._release(jobs)

    def _prefill(self, engine: Engine, jobs: list[Job]) -> None:
        (job,) = jobs
        device = engine.cache.k.device
        seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(63)
        job.generator = torch.Generator(device=device).manual_seed(seed)
        job.stream = TextStream(job.model.tokenizer, job.stop)
        job.history = list(job.prompt)
        prompt = torch.tensor([job.prompt], device=device)
        job.guard = word_guard(engine.gpt, job.model.tokenizer, prompt, job.sampling)
        with engine.using(job.model.adapter):
            logits = engine.gpt.decode(prompt, engine.cache.slot(job.slot))
        job.position = len(job.prompt)
        self._choose([job], logits[:, -1])

    def _step(self, engine: Engine, jobs: list[Job]) -> None:
        """One new token for every job on `engine`: one batched forward per adapter in use."""
        device = engine.cache.k.device
        groups: dict[str | None, list[Job]] = {}
        for job in sorted(jobs, key=lambda j: j.slot):
            groups.setdefault(job.model.adapter, []).append(job)
        for adapter, group in groups.items():
            rows = torch.tensor([job.slot for job in group], device=device)
            positions = torch.tensor([job.position for job in group], device=device)
            tokens = torch.tensor([[job.pending] for job in group], device=device)
            with engine.using(adapter):
                logits = engine.gpt.decode_rows(tokens, engine.cache, rows, positions)
            for job in group:
                job.position += 1
            self._choose(group, logits[:, -1])

    def _choose(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Sample each job's next token from its row of logits [B, V]. Jobs that sample alike share one
        pass over their rows (the per-token cost that grows with the batch); each draw still uses its
        own job's generator, so a seed gives the same text whoever else is being served."""
        alike: dict[tuple, list[int]] = {}
        for row, job in enumerate(jobs):
            s = job.sampling
            # The repetition penalty and known words read a job's own text, so such a job is sampled alone.
            own = row if s.repetition_penalty != 1.0 or job.guard is not None else None
            key = (s.temperature, s.top_k, s.top_p, s.repetition_penalty, job.model.tokenizer.vocab_size, own)
            alike.setdefault(key, []).append(row)
        tokens: dict[int, int] = {}
        for rows in alike.values():
            first = jobs[rows[0]]
            sampling = first.sampling
            # Only this model's vocabulary: an adapter may have grown the vocabulary the engine shares.
            group_logits = logits[rows, : first.model.tokenizer.vocab_size]
            if first.guard is not None:
                group_logits = first.guard.restrict(group_logits)
            seen = first.history if sampling.repetition_penalty != 1.0 else []
            history = torch.tensor([seen], dtype=torch.long, device=logits.device)
            scores = process_logits(group_logits, history, sampling)
            if sampling.temperature == 0:
                tokens.update(zip(rows, scores.argmax(dim=-1).tolist(), strict=True))
                continue
            probs = scores.softmax(dim=-1)
            for i, row in enumerate(rows):
                tokens[row] = int(draw(probs[i : i + 1], jobs[row].generator))
        for row, job in enumerate(jobs):
            self._advance(job, tokens[row])

    def _advance(self, job: Job, token: int) -> None:
        """Take the job's new token: send the text it completes, and end the job at EOS, a stop string,
        max_tokens or the end of the context."""
        tokenizer = job.model.tokenizer
        job.history.append(token)
        if job.guard is not None:
            job.guard.advance([token])
        self.decoded += 1
        if token == tokenizer.eos_id:
            return self._finish(job, "stop")
        job.completion_tokens += 1
        if piece := job.stream.add(token):
            self._send(job, ("text", piece))
        if job.stream.stopped:
            return self._finish(job, "stop")
        if job.completion_tokens >= job.max_tokens or job.position >= job.model.block_size:
            return self._finish(job, "length")
        job.pending = token

    def _finish(self, job: Job, reason: str) -> None:
        if rest := job.stream.finish():
            self._send(job, ("text", rest))
        job.finish_reason = reason
        self._send(job, ("end", reason))
        self._release([job])

    def _send(self, job: Job, event: tuple[str, str]) -> None:
        self._outbox.setdefault(job.loop, []).append((job, event))

    def _flush(self) -> None:
        """Hand the events so far to the clients' event loops, one wake-up per loop rather than per token."""
        self._flushed = time.monotonic()
        outbox, self._outbox = self._outbox, {}
        for loop, events in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for job, _ in events:
                    job.cancel()

    def _release(self, jobs: list[Job]) -> None:
        for job in jobs:
            engine = job.model.engine
            active = self._active.get(engine, [])
            if job in active:
                active.remove(job)
                self._free[engine].append(job.slot)
                self._free[engine].sort()


def _deliver(events: list[tuple[Job, tuple[str, str]]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)
