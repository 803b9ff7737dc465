"""The page routes of `kiln serve` in an app of their own: the pages and static files (no key needed, no
way out of static/), saved conversations over /api/ (404s, 400s, the API key), and the runs of a real
tiny training run (settings, checkpoints, metrics after a step while a line is still being written, and
loading a checkpoint into the model registry)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from kiln.errors import ConfigError
from kiln.serve.auth import APIError
from kiln.serve.pages import router
from kiln.serve.store import ConversationStore

TINY_RUN = ["--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--set", "n_layer=1"]
TINY_RUN += ["--set", "block_size=32", "--set", "eval_batches=2", "--set", "eval_interval=10", "--max-iters", "20"]


class RecordingModels:
    """Stands in for the server's model registry: records what it was asked to load."""

    def __init__(self, fails: bool = False):
        self.added: list[tuple[str, Path]] = []
        self.fails = fails

    def add_checkpoint(self, model_id: str, folder: Path) -> str:
        if self.fails:
            raise ConfigError(f"{folder}: not a Kiln checkpoint")
        self.added.append((model_id, Path(folder)))
        return model_id


def page_app(store: ConversationStore, runs_dir: Path | None = None, api_key: str | None = None) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    app.state.store, app.state.runs_dir, app.state.models = store, runs_dir, RecordingModels()
    app.state.api_key = api_key
    app.add_exception_handler(APIError, lambda request, error: error.response())
    app.add_exception_handler(
        RequestValidationError, lambda request, error: APIError(400, str(error.errors()[0]["msg"])).response()
    )
    return app


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mirror) -> Path:
    """A real run folder from `kiln train`: metrics.jsonl with rows at steps 10 and 20, best/, last/."""
    out = tmp_path_factory.mktemp("trained") / "verdict"
    env = {**os.environ, "KILN_DATA_DIR": str(mirror), "OMP_NUM_THREADS": "1", "KILN_QUIET": "1"}
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "train", *TINY_RUN, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def store(tmp_path):
    store = ConversationStore(tmp_path / "chat.db")
    yield store
    store.close()


@pytest.fixture
def client(store):
    return TestClient(page_app(store))


@pytest.fixture
def runs_dir(tmp_path, trained_run) -> Path:
    """A runs folder holding a copy of the trained run, and things that are not runs."""
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "verdict")
    (runs / "empty").mkdir()
    (runs / "notes.txt").write_text("not a run")
    return runs


@pytest.fixture
def runs_client(store, runs_dir):
    return TestClient(page_app(store, runs_dir))


# --- pages and static files ----------------------------------------------------------------------------


def test_the_pages_and_their_files_are_served(client):
    chat = client.get("/")
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/html")
    assert "/static/chat.js" in chat.text
    runs = client.get("/runs")
    assert runs.status_code == 200 and "/static/runs.js" in runs.text
    for name, kind in (("chat.js", "javascript"), ("runs.js", "javascript"), ("api.js", "javascript")):
        served = client.get(f"/static/{name}")
        assert served.status_code == 200 and kind in served.headers["content-type"]
    assert "text/css" in client.get("/static/kiln.css").headers["content-type"]


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.js",
        "/static/..%2Fpages.py",
        "/static/%2e%2e%2fstore.py",
        "/static/..%2F..%2Fcli.py",
        "/static/%2e%2e",
        "/static/../pages.py",
        "/static/%2Fetc%2Fpasswd",
        "/static/..%5Cpages.py",
    ],
)
def test_static_serves_nothing_outside_its_folder(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert "import" not in answer.text and "root:" not in answer.text


# --- conversations ---------------------------------------------------------------------------------------


def test_a_conversation_through_the_api(client):
    created = client.post("/api/conversations", json={"title": "first chat", "model": "base"})
    assert created.status_code == 201
    conversation = created.json()
    cid = conversation["id"]
    assert conversation["title"] == "first chat" and conversation["model"] == "base"

    user = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": "hello"})
    assert user.status_code == 201 and user.json()["role"] == "user"
    reply = {"role": "assistant", "content": "<b>hi</b>", "model": "tuned"}
    assert client.post(f"/api/conversations/{cid}/messages", json=reply).status_code == 201

    got = client.get(f"/api/conversations/{cid}").json()
    assert [(m["role"], m["content"], m["model"]) for m in got["messages"]] == [
        ("user", "hello", None),
        ("assistant", "<b>hi</b>", "tuned"),
    ]
    assert client.patch(f"/api/conversations/{cid}", json={"title": "renamed"}).json()["title"] == "renamed"
    listed = client.get("/api/conversations").json()["data"]
    assert [(c["id"], c["title"], c["message_count"]) for c in listed] == [(cid, "renamed", 2)]

    exported = client.get(f"/api/conversations/{cid}/export")
    assert exported.status_code == 200
    assert exported.headers["content-disposition"] == f'attachment; filename="kiln-conversation-{cid}.json"'
    assert json.loads(exported.text)["messages"][1]["content"] == "<b>hi</b>"

    assert client.delete(f"/api/conversations/{cid}").json() == {"id": cid, "deleted": True}
    assert client.get("/api/conversations").json()["data"] == []


def test_a_conversation_needs_no_body_to_start(client):
    conversation = client.post("/api/conversations").json()
    assert conversation["title"] == "New chat" and conversation["model"] is None


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/api/conversations/{id}", None),
        ("PATCH", "/api/conversations/{id}", {"title": "x"}),
        ("DELETE", "/api/conversations/{id}", None),
        ("POST", "/api/conversations/{id}/messages", {"role": "user", "content": "x"}),
        ("GET", "/api/conversations/{id}/export", None),
    ],
)
def test_an_unknown_conversation_is_404_in_openai_shape(client, method, path, body):
    answer = client.request(method, path.format(id="0" * 32), json=body)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert "no conversation" in error["message"] and error["type"] == "not_found_error"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/api/conversations", {"title": "x" * 201}),
        ("POST", "/api/conversations", {"titel": "typo"}),
        ("PATCH", "/api/conversations/{id}", {"title": ""}),
        ("PATCH", "/api/conversations/{id}", {}),
        ("POST", "/api/conversations/{id}/messages", {"role": "robot", "content": "x"}),
        ("POST", "/api/conversations/{id}/messages", {"role": "user"}),
        ("POST", "/api/conversations/{id}/messages", {"role": "user", "content": 5}),
    ],
)
def test_a_bad_body_is_400(client, method, path, body):
    cid = client.post("/api/conversations").json()["id"]
    assert client.request(method, path.format(id=cid), json=body).status_code == 400


def test_sql_in_a_title_stays_text(client):
    attack = "'); DROP TABLE conversations;--"
    cid = client.post("/api/conversations", json={"title": attack}).json()["id"]
    assert client.get(f"/api/conversations/{cid}").json()["title"] == attack
    assert client.get("/api/conversations/' OR '1'='1").status_code == 404
    assert len(client.get("/api/conversations").json()["data"]) == 1


API_ROUTES = [
    ("GET", "/api/conversations"),
    ("POST", "/api/conversations"),
    ("GET", "/api/conversations/abc"),
    ("PATCH", "/api/conversations/abc"),
    ("DELETE", "/api/conversations/abc"),
    ("POST", "/api/conversations/abc/messages"),
    ("GET", "/api/conversations/abc/export"),
    ("GET", "/api/runs"),
    ("GET", "/api/runs/verdict/metrics"),
    ("POST", "/api/runs/verdict/chat"),
]


@pytest.mark.parametrize("method, path", API_ROUTES)
def test_with_an_api_key_every_api_route_asks_for_it(store, method, path):
    client = TestClient(page_app(store, api_key="sesame"))
    answer = client.request(method, path)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    wrong = client.request(method, path, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401


def test_with_an_api_key_the_pages_open_and_the_key_lets_the_api_answer(store):
    client = TestClient(page_app(store, api_key="sesame"))
    for page in ("/", "/runs", "/static/chat.js"):
        assert client.get(page).status_code == 200
    key = {"Authorization": "Bearer sesame"}
    assert client.post("/api/conversations", headers=key).status_code == 201
    assert len(client.get("/api/conversations", headers=key).json()["data"]) == 1


# --- runs --------------------------------------------------------------------------------------------------


def test_without_a_runs_folder_there_are_no_runs(client):
    assert client.get("/api/runs").json() == {"object": "list", "runs_dir": None, "data": []}
    assert client.get("/api/runs/verdict/metrics").status_code == 404
    assert client.post("/api/runs/verdict/chat").status_code == 404


def test_a_trained_run_is_listed_with_its_settings_checkpoints_and_last_metrics(runs_client, runs_dir):
    listing = runs_client.get("/api/runs").json()
    assert listing["runs_dir"] == str(runs_dir)
    (run,) = listing["data"]  # the empty folder and the text file are not runs
    assert run["name"] == "verdict" and run["step"] == 20
    assert {(c["name"], c["kind"]) for c in run["checkpoints"]} == {("best", "checkpoint"), ("last", "checkpoint")}
    last = next(c for c in run["checkpoints"] if c["name"] == "last")
    assert last["step"] == 20 and isinstance(last["best_val_loss"], float)
    settings = run["settings"]
    assert settings["model"]["n_layer"] == 1 and settings["model"]["block_size"] == 32
    assert settings["optim"]["optimizer"] and "kiln" not in settings
    assert run["last_metrics"]["step"] == 20
    assert {"train_loss", "val_loss"} <= set(run["last_metrics"])


def test_metrics_after_a_step(runs_client):
    every = runs_client.get("/api/runs/verdict/metrics").json()["data"]
    assert [row["step"] for row in every] == [10, 20]
    assert [row["step"] for row in runs_client.get("/api/runs/verdict/metrics?after=10").json()["data"]] == [20]
    assert runs_client.get("/api/runs/verdict/metrics?after=20").json()["data"] == []
    assert runs_client.get("/api/runs/verdict/metrics?after=ten").status_code == 400


def test_a_line_still_being_written_waits_for_the_next_read(runs_client, runs_dir):
    metrics = runs_dir / "verdict" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 30, "train_loss": 2.5, "val_l')
    assert [row["step"] for row in runs_client.get("/api/runs/verdict/metrics?after=10").json()["data"]] == [20]
    assert runs_client.get("/api/runs").json()["data"][0]["last_metrics"]["step"] == 20
    with open(metrics, "a") as f:
        f.write('oss": NaN}\n')
    (row,) = runs_client.get("/api/runs/verdict/metrics?after=20").json()["data"]
    assert row == {"step": 30, "train_loss": 2.5, "val_loss": None}  # JSON has no NaN: the page gets null


@pytest.mark.parametrize("name", ["..", "%2e%2e", "..%2Fverdict", "verdict%2Fbest", "empty", "notes.txt", "nope"])
def test_run_names_are_runs_directly_in_the_folder(runs_client, name):
    assert runs_client.get(f"/api/runs/{name}/metrics").status_code == 404
    assert runs_client.post(f"/api/runs/{name}/chat").status_code == 404


def test_a_link_out_of_the_runs_folder_is_refused(store, runs_dir, tmp_path, trained_run):
    (runs_dir / "elsewhere").symlink_to(trained_run)
    client = TestClient(page_app(store, runs_dir))
    assert [run["name"] for run in client.get("/api/runs").json()["data"]] == ["verdict"]
    assert client.get("/api/runs/elsewhere/metrics").status_code == 404


def test_chat_with_a_run_loads_its_best_checkpoint(store, runs_dir):
    app = page_app(store, runs_dir)
    client = TestClient(app)
    assert client.post("/api/runs/verdict/chat").json() == {"model": "verdict/best"}
    assert client.post("/api/runs/verdict/chat", json={"checkpoint": "last"}).json() == {"model": "verdict/last"}
    assert app.state.models.added == [
        ("verdict/best", runs_dir / "verdict" / "best"),
        ("verdict/last", runs_dir / "verdict" / "last"),
    ]
    for checkpoint in ("../../verdict/best", "/etc", "tokenizer", "best/tokenizer"):
        assert client.post("/api/runs/verdict/chat", json={"checkpoint": checkpoint}).status_code == 404
    assert len(app.state.models.added) == 2


def test_a_sub_run_offers_its_checkpoints_too(store, runs_dir):
    shutil.copytree(runs_dir / "verdict" / "best", runs_dir / "verdict" / "lora" / "best")
    app = page_app(store, runs_dir)
    client = TestClient(app)
    (run,) = client.get("/api/runs").json()["data"]
    assert [c["name"] for c in run["checkpoints"]] == ["best", "last", "lora/best"]
    assert (
        client.post("/api/runs/verdict/chat", json={"checkpoint": "lora/best"}).json()["model"] == "verdict/lora/best"
    )
    assert app.state.models.added == [("verdict/lora/best", runs_dir / "verdict" / "lora" / "best")]


def test_a_checkpoint_the_registry_cannot_load_is_400_with_its_reason(store, runs_dir):
    app = page_app(store, runs_dir)
    app.state.models = RecordingModels(fails=True)
    answer = TestClient(app).post("/api/runs/verdict/chat")
    assert answer.status_code == 400 and "not a Kiln checkpoint" in answer.json()["error"]["message"]


def test_chat_with_the_run_already_served_answers_its_id_without_a_second_copy(store, runs_dir):
    from kiln.serve.models import ModelRegistry

    models = ModelRegistry("cpu", slots=1)
    models.load(runs_dir / "verdict")  # as `kiln serve runs/verdict` does: its best/
    (served,) = [m["id"] for m in models.listing()]
    app = page_app(store, runs_dir)
    app.state.models = models
    client = TestClient(app)
    assert client.post("/api/runs/verdict/chat").json() == {"model": served}
    assert [m["id"] for m in models.listing()] == [served]
    assert client.post("/api/runs/verdict/chat", json={"checkpoint": "last"}).json() == {"model": "verdict/last"}
    assert sorted(m["id"] for m in models.listing()) == sorted([served, "verdict/last"])
