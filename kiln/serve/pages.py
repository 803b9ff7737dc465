"""The web side of `kiln serve`: the chat and runs pages, their static files, and the JSON API they
call under /api/ (saved conversations, training runs). Every /api/ route asks for the API key when the
server has one; the pages themselves do not, since they only hold code and ask for the key.

The router reads app.state.store (a ConversationStore), app.state.runs_dir (a Path or None) and
app.state.models (the model registry, for `add_checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import KilnError
from kiln.serve.auth import APIError, require_api_key
from kiln.serve.runs import list_runs, read_metrics_after, run_checkpoints, run_folder
from kiln.serve.store import ConversationStore

STATIC_DIR = Path(__file__).parent / "static"
MAX_TITLE = 200
MAX_CONTENT = 1_000_000  # characters; far more than any context a Kiln model holds

router = APIRouter()
api = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)])


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(None, max_length=MAX_TITLE)
    model: str | None = None


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=MAX_TITLE)


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT)
    model: str | None = None


class ChatWithRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "best"


def _page(name: str) -> FileResponse:
    # no-cache: the browser revalidates, so a newer Kiln's page is never mixed with an older script.
    return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
def chat_page() -> FileResponse:
    """The chat: saved conversations, streamed replies, settings, Compare."""
    return _page("chat.html")


@router.get("/runs", include_in_schema=False)
def runs_page() -> FileResponse:
    """The runs under --runs: loss curves, settings, checkpoints to chat with."""
    return _page("runs.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """A file of kiln/serve/static/ by its bare name; anything else (`..`, sub-paths) is not found."""
    if name not in {path.name for path in STATIC_DIR.iterdir() if path.is_file()}:
        raise APIError(404, f"no static file {name!r}")
    return _page(name)


def _store(request: Request) -> ConversationStore:
    return request.app.state.store


def _not_found(conversation_id: str) -> APIError:
    return APIError(404, f"no conversation {conversation_id!r}", param="id", code="conversation_not_found")


@api.get("/conversations")
def list_conversations(request: Request) -> dict:
    """Every saved conversation (without messages), the most recently updated first."""
    return {"object": "list", "data": _store(request).list()}


@api.post("/conversations", status_code=201)
def create_conversation(request: Request, body: NewConversation | None = None) -> dict:
    """A new conversation; the body (title, model) may be left out."""
    body = body or NewConversation()
    return _store(request).create(title=body.title, model=body.model)


@api.get("/conversations/{conversation_id}")
def get_conversation(request: Request, conversation_id: str) -> dict:
    """One conversation with its messages in order."""
    conversation = _store(request).get(conversation_id)
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


@api.patch("/conversations/{conversation_id}")
def rename_conversation(request: Request, conversation_id: str, body: Rename) -> dict:
    """A new title; answers the conversation as it is now."""
    if not _store(request).rename(conversation_id, body.title):
        raise _not_found(conversation_id)
    return _store(request).get(conversation_id)


@api.delete("/conversations/{conversation_id}")
def delete_conversation(request: Request, conversation_id: str) -> dict:
    """The conversation and its messages, gone."""
    if not _store(request).delete(conversation_id):
        raise _not_found(conversation_id)
    return {"id": conversation_id, "deleted": True}


@api.post("/conversations/{conversation_id}/messages", status_code=201)
def add_message(request: Request, conversation_id: str, body: NewMessage) -> dict:
    """Append one message (the page saves the user's before asking, the reply after it streamed)."""
    message = _store(request).add_message(conversation_id, body.role, body.content, body.model)
    if message is None:
        raise _not_found(conversation_id)
    return message


@api.get("/conversations/{conversation_id}/export")
def export_conversation(request: Request, conversation_id: str) -> JSONResponse:
    """The whole conversation as a JSON file to download."""
    exported = _store(request).export(conversation_id)
    if exported is None:
        raise _not_found(conversation_id)
    filename = f"kiln-conversation-{conversation_id}.json"  # the id is a hex uuid: safe in a header
    return JSONResponse(exported, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _runs_dir(request: Request) -> Path | None:
    runs_dir = getattr(request.app.state, "runs_dir", None)
    return Path(runs_dir) if runs_dir is not None else None


def _run(request: Request, name: str) -> Path:
    folder = run_folder(_runs_dir(request), name)
    if folder is None:
        raise APIError(404, f"no run {name!r} in the runs folder", param="name", code="run_not_found")
    return folder


@api.get("/runs")
def runs(request: Request) -> dict:
    """Every run in the runs folder with its settings, checkpoints and last metrics row."""
    runs_dir = _runs_dir(request)
    return {"object": "list", "runs_dir": str(runs_dir) if runs_dir else None, "data": list_runs(runs_dir)}


@api.get("/runs/{name}/metrics")
def run_metrics(request: Request, name: str, after: float | None = None) -> dict:
    """The run's metrics rows with a step after `after`: the page polls with its last step to grow its curves."""
    return {"object": "list", "data": read_metrics_after(_run(request, name), after)}


@api.post("/runs/{name}/chat")
def chat_with_run(request: Request, name: str, body: ChatWithRun | None = None) -> dict:
    """Load one of the run's checkpoints (best/ unless told) into the server; answers the model id to chat with."""
    folder = _run(request, name)
    checkpoint = (body or ChatWithRun()).checkpoint
    if checkpoint not in {found["name"] for found in run_checkpoints(folder)}:
        raise APIError(404, f"run {name!r} has no checkpoint {checkpoint!r}", param="checkpoint")
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise APIError(503, "this server has no model registry to load checkpoints into")
    try:
        model_id = models.add_checkpoint(f"{name}/{checkpoint}", folder / checkpoint)
    except KilnError as e:
        raise APIError(400, str(e), param="name") from None
    return {"model": model_id}


router.include_router(api)
