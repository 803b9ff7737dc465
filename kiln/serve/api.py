"""OpenAI's wire format: /v1/chat/completions, /v1/completions (streamed as server-sent events, or
whole), /v1/models; what the official `openai` client sends and reads, field for field."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kiln.data.instructions import Message
from kiln.data.templates import encode_pieces
from kiln.data.tokenizers.char import UnknownCharacter
from kiln.errors import KilnError
from kiln.generate.sampling import SamplingConfig
from kiln.serve.auth import APIError, require_api_key
from kiln.serve.models import ServedModel
from kiln.serve.scheduler import Job


@dataclass
class Limits:
    """What one request may ask for."""

    max_messages: int = 256
    max_chars: int = 100_000


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. Fields OpenAI has and Kiln does not use (logprobs, penalties
    by frequency, user, ...) are accepted and ignored, as other OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    known_words: bool = False  # Kiln's: only words the model has read (kiln.generate.known_words)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # 0 is greedy, not "unset"
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            known_words=self.known_words,
        )

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        return stops

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    truncate_history: bool = False  # Kiln's: drop the oldest turns to fit the context instead of a 413


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] = ""


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models")
def list_models(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.models.listing()}


@router.get("/models/{model_id:path}")
def get_model(model_id: str, request: Request) -> dict:
    return request.app.state.models.get(model_id).describe()


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    served = request.app.state.models.get(body.model)
    limits: Limits = request.app.state.limits
    _check_common(body)
    if len(body.messages) > limits.max_messages:
        raise APIError(413, f"messages: {len(body.messages)} messages; at most {limits.max_messages}", "messages")
    messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
    _check_size(sum(len(m.content) for m in messages), limits, "messages")
    prompt = _chat_prompt(served, messages, body)
    return await _respond(request, body, served, prompt, chat=True)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    served = request.app.state.models.get(body.model)
    _check_common(body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) > 1:
            raise APIError(400, "prompt: one prompt per request (a list of several is n > 1)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_size(len(prompt), request.app.state.limits, "prompt")
        ids = _encode(served, prompt, "prompt")
    else:
        ids = list(prompt)
        if any(not 0 <= i < served.tokenizer.vocab_size for i in ids):
            raise APIError(400, f"prompt: token ids must lie in 0..{served.tokenizer.vocab_size - 1}", "prompt")
    if not ids:  # an empty prompt starts from a document boundary, as `kiln sample` does
        ids = [served.tokenizer.eos_id if served.tokenizer.eos_id is not None else 0]
    _check_fits(served, ids, "prompt")
    return await _respond(request, body, served, ids, chat=False)


def _check_common(body: Sampling) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "n: Kiln answers one choice per request (n = 1)", param="n")
    body.stops()


def _check_size(chars: int, limits: Limits, param: str) -> None:
    if chars > limits.max_chars:
        raise APIError(413, f"{param}: {chars:,} characters; at most {limits.max_chars:,} a request", param)


def _encode(served: ServedModel, text: str, param: str) -> list[int]:
    """Text as plain text: a special token's spelling in it stays characters, never the token."""
    try:
        return served.tokenizer.encode_plain(text)
    except UnknownCharacter as e:
        raise APIError(400, f"{param}: this model cannot read {e.char!r} (U+{ord(e.char):04X})", param) from None


def _chat_prompt(served: ServedModel, messages: list[Message], body: ChatRequest) -> list[int]:
    """The conversation in the model's own template; the oldest whole turns go first when asked to fit."""
    for number, message in enumerate(messages):
        _encode(served, message.content, f"messages[{number}].content")
    block = served.block_size
    budget = max(block - (body.asked_tokens() or 0), block // 2) if body.truncate_history else block - 1
    system = [m for m in messages[:1] if m.role == "system"]
    turns = messages[len(system) :]
    try:
        while True:
            ids = encode_pieces(served.template.render(system + turns, generation_prompt=True), served.tokenizer).ids
            newer = next((i for i, m in enumerate(turns) if i > 0 and m.role == "user"), None)
            if len(ids) <= budget or not body.truncate_history or newer is None:
                break
            turns = turns[newer:]
    except KilnError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    _check_fits(served, ids, "messages")
    return ids


def _check_fits(served: ServedModel, ids: list[int], param: str) -> None:
    if len(ids) >= served.block_size:
        hint = "; send fewer or shorter messages, or set truncate_history" if param == "messages" else ""
        raise APIError(
            413,
            f"{param}: {len(ids):,} tokens do not fit the context of {served.block_size:,} with room for a reply{hint}",
            param,
            code="context_length_exceeded",
        )


async def _respond(request: Request, body: Sampling, served: ServedModel, prompt: list[int], chat: bool):
    room = served.block_size - len(prompt)
    max_tokens = min(body.asked_tokens() or room, room)  # clamped to the context
    try:
        sampling = body.sampling(max_tokens)
    except KilnError as e:
        raise APIError(400, str(e)) from None
    job = Job(served, prompt, sampling, max_tokens, body.stops() + served.stop, asyncio.get_running_loop())
    request.app.state.scheduler.submit(job)
    reply = Reply(chat, served.id, len(prompt))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(request, job, reply, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text = []
    async for kind, value in _events(request, job):
        if kind == "text":
            text.append(value)
    return reply.whole("".join(text), job)


async def _events(request: Request, job: Job) -> AsyncIterator[tuple[str, str]]:
    """The job's events until it ends; the job is cancelled if the client goes away first."""
    try:
        while True:
            try:
                event = (
                    job.events.get_nowait()
                    if not job.events.empty()
                    else await asyncio.wait_for(job.events.get(), timeout=1.0)
                )
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            # Whatever text has piled up goes out as one piece: a busy server sends fewer, longer
            # deltas (each chunk costs the same to frame and parse), an idle one a token at a time.
            text = []
            while event is not None and event[0] == "text":
                text.append(event[1])
                event = job.events.get_nowait() if not job.events.empty() else None
            if text:
                yield "text", "".join(text)
            if event is not None:
                kind, value = event
                if kind == "error":
                    raise APIError(500, value)
                return
    finally:
        if job.finish_reason is None:
            job.cancel()
            request.app.state.scheduler.wake()


async def _stream(request: Request, job: Job, reply: Reply, usage: bool) -> AsyncIterator[str]:
    if reply.chat:  # the first delta carries the role
        yield _sse(reply.chunk(role=True, usage=usage))
    try:
        async for _, text in _events(request, job):
            yield _sse(reply.chunk(text=text, usage=usage))
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
        return
    yield _sse(reply.chunk(finish=job.finish_reason, usage=usage))
    if usage:
        yield _sse({**reply.chunk(usage=True), "choices": [], "usage": reply.usage(job)})
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Reply:
    """The envelope every chunk and reply of one request shares: id, object, created, model."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def envelope(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self, job: Job) -> dict:
        done = job.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None, usage: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.envelope(stream=True), "choices": [choice], **({"usage": None} if usage else {})}

    def whole(self, text: str, job: Job) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": job.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
        return {**self.envelope(stream=False), "choices": [choice], "usage": self.usage(job)}
