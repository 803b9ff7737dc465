"""The web chat in a real browser (Chromium through Playwright) against a real `kiln serve` process
(conftest's live_server): a reply streams into its bubble, the conversation survives a reload and a
server restart, a restarted server with an API key lets the page in once the key is entered, markup in
messages stays text, and the runs page draws the run's curves and opens a chat with its best/. Then
what was checked by hand: Stop ends a streaming reply and frees its slot; a conversation is renamed,
exported as JSON and deleted from the list, each lasting through a reload; and Compare shows the base's
and the tuned model's answers side by side, the base's equal to what the API answers at temperature 0.

Skipped, saying why, where Chromium or Playwright is missing. KILN_SCREENSHOTS=1 saves the screenshots
into docs/images/ (serve-chat.png, serve-runs.png) instead of the test's temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN = ["--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--set", "n_layer=1"]
TRAIN += ["--set", "eval_batches=2", "--set", "eval_interval=10", "--max-iters", "20"]
MARKUP = "<b>bold</b> <script>window.injected = 1</script> <img src=x onerror=window.injected=2>"


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does) to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install playwright (its own browsers are not needed)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def kiln_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "KILN_QUIET": "1", "XDG_CACHE_HOME": str(tmp / "cache")}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, mirror) -> Path:
    """A runs folder with one real run of `kiln train` in it (runs/verdict: metrics.jsonl, best/, last/)."""
    runs = tmp_path_factory.mktemp("runs")
    env = {**kiln_env(runs.parent), "KILN_DATA_DIR": str(mirror)}
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "train", *TRAIN, "--out", str(runs / "verdict")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return runs


@pytest.fixture
def serve(tmp_path, runs_dir, live_server) -> Callable:
    """`serve(*extra)` starts `kiln serve` on the trained run (a run folder means its best/) with one chat.db
    for the test, so a second server (a restart) finds the first one's conversations."""

    def start(*extra: str) -> LiveServer:
        env = {"OMP_NUM_THREADS": "2", "XDG_CACHE_HOME": str(tmp_path / "cache")}
        server = live_server(runs_dir / "verdict", "--db", tmp_path / "chat.db", "--runs", runs_dir, *extra, env=env)
        assert server.url in server.output(), "kiln serve did not print its address"
        return server

    return start


def screenshot_path(tmp_path: Path, name: str) -> Path:
    if os.environ.get("KILN_SCREENSHOTS") == "1":
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        return REPO / "docs" / "images" / name
    return tmp_path / name


# Counts the text updates of reply bubbles while they stream: more than one means the reply arrived in pieces.
COUNT_STREAMED_UPDATES = """
window.streamedLengths = [];
new MutationObserver(() => {
  const streaming = document.querySelector(".message.assistant.streaming .content");
  if (streaming) window.streamedLengths.push(streaming.textContent.length);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def open_chat(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=60_000)


def bubbles(page) -> list[tuple[str, str]]:
    """(role, text) of every message on the page, in order."""
    found = page.eval_on_selector_all(
        "#messages .message",
        "nodes => nodes.map(n => [n.classList.contains('user') ? 'user' : 'assistant', "
        "n.querySelector('.content').textContent])",
    )
    return [tuple(pair) for pair in found]


def test_chat_streams_saves_and_survives_reload_and_restart(chromium, serve, tmp_path):
    server = serve()
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(COUNT_STREAMED_UPDATES)
    page = context.new_page()
    page_errors = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    open_chat(page, server.url + "/")
    page.fill("#temperature", "1.0")
    page.fill("#max-tokens", "200")

    send(page, "Tell me about the picture.")
    (user, reply) = bubbles(page)
    assert user == ("user", "Tell me about the picture.")
    assert reply[0] == "assistant" and reply[1].strip() and not reply[1].startswith("Error")
    lengths = {length for length in page.evaluate("window.streamedLengths") if length > 0}
    assert len(lengths) >= 2, f"the reply did not arrive in pieces: lengths seen while streaming {sorted(lengths)}"
    conversation_id = page.evaluate("location.hash.slice(1)")
    assert len(conversation_id) == 32
    assert page.inner_text("#conversations .conversation.active .open") == "Tell me about the picture."
    page.screenshot(path=str(screenshot_path(tmp_path, "serve-chat.png")))

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert bubbles(page) == [user, reply]

    # Markup from the user and (saved) from a model is shown as the characters typed, never as elements.
    send(page, MARKUP)
    httpx.post(
        f"{server.url}/api/conversations/{conversation_id}/messages",
        json={"role": "assistant", "content": MARKUP, "model": "someone"},
    ).raise_for_status()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    texts = [text for _, text in bubbles(page)]
    assert MARKUP in texts[2] and texts[-1] == MARKUP
    assert page.locator("#messages b, #messages script, #messages img").count() == 0
    assert page.evaluate("window.injected") is None

    server.stop()
    server = serve("--api-key", "sesame")
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert "API key" in page.inner_text("#status")  # 401 until the key is entered
    page.fill("#api-key", "sesame")
    page.press("#api-key", "Enter")
    page.wait_for_selector(f"#conversations .conversation[data-id='{conversation_id}']")
    page.click(f"#conversations .conversation[data-id='{conversation_id}'] .open")
    page.wait_for_function("() => document.querySelectorAll('#messages .message').length >= 4")
    assert bubbles(page)[:2] == [user, reply]
    assert page.evaluate("localStorage.getItem('kiln.apiKey')") == "sesame"
    assert page_errors == []
    context.close()


def test_runs_page_draws_the_run_and_opens_a_chat_with_its_best(chromium, serve, tmp_path):
    server = serve()
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/runs")
    page.wait_for_selector("body[data-ready=true]")
    card = page.locator(".run[data-run='verdict']")
    assert "1 layer, 2 heads" in card.inner_text()
    assert card.locator("canvas").get_attribute("data-points") not in (None, "0")
    inked = page.evaluate(
        """() => {
            const canvas = document.querySelector(".run[data-run='verdict'] canvas");
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let inked = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked += 1;
            return inked;
        }"""
    )
    assert inked > 500, "the loss curves were not drawn"
    page.screenshot(path=str(screenshot_path(tmp_path, "serve-runs.png")), full_page=True)

    card.get_by_role("button", name="Chat with best/").click()
    page.wait_for_url("**/?model=*")
    page.wait_for_selector("body[data-ready=true]")
    model = page.input_value("#model")
    assert model, "the chat page did not select the run's model"
    assert model in {entry["id"] for entry in httpx.get(server.url + "/v1/models").json()["data"]}
    send(page, "Hello there.")
    assert bubbles(page)[1][0] == "assistant" and not bubbles(page)[1][1].startswith("Error")
    page.close()


# --- what was checked by hand: Stop, the conversation list's rename, export and delete, Compare ---------


def expect(target):
    """Playwright's auto-waiting assertions, imported here: without playwright the chromium fixture skips."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture
def page(chromium) -> Iterator:
    """A page in a browser context of its own (its own localStorage); a script error on it fails the test."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"script errors on the page: {errors}"


@pytest.fixture
def tuned_server(live_server, served_runs, tmp_path) -> LiveServer:
    """The tuned model that learned conftest's four answers (and its base), with a chat.db of the test's own."""
    return live_server(served_runs["tuned"].parent, "--db", tmp_path / "chat.db")


def ask(page, question: str) -> str:
    """Sends `question` in the open chat at temperature 0 and answers the saved conversation's id."""
    page.fill("#temperature", "0")
    send(page, question)
    assert bubbles(page)[-2][1] == question
    return page.evaluate("location.hash.slice(1)")


def listed(page, conversation_id: str):
    return page.locator(f"#conversations .conversation[data-id='{conversation_id}']")


def saved(server: LiveServer, conversation_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/api/conversations/{conversation_id}", timeout=10)


def reload(page) -> None:
    page.reload()
    page.wait_for_selector("body[data-ready=true]")


def test_stop_ends_a_streaming_reply_keeps_its_text_and_frees_the_slot(page, live_server, long_checkpoint, tmp_path):
    # One slot, and a model whose reply would fill 1,024 positions: Stop must hand the slot back.
    server = live_server(long_checkpoint, "--max-batch", "1", "--db", tmp_path / "chat.db")
    open_chat(page, server.url + "/")
    page.fill("#temperature", "1.0")
    page.fill("#max-tokens", "1000")
    page.fill("#prompt", "once upon a time")
    page.click("#send")
    streaming = page.locator("#messages .message.assistant.streaming .content")
    page.wait_for_function(
        "() => { const c = document.querySelector('#messages .message.assistant.streaming .content');"
        " return c !== null && c.textContent.length >= 20; }",
        timeout=30_000,
    )
    assert page.is_enabled("#stop") and page.is_disabled("#send") and page.is_disabled("#new-chat")
    assert server.health()["active"] == 1
    page.click("#stop")

    # Idle again: Send back, Stop greyed out, no bubble streaming, and the text no longer grows.
    page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=10_000)
    assert page.is_disabled("#stop") and page.is_enabled("#new-chat")
    assert streaming.count() == 0
    reply = page.locator("#messages .message.assistant").last
    shown = reply.locator(".content").text_content()
    page.wait_for_timeout(1000)
    assert reply.locator(".content").text_content() == shown
    assert 20 <= len(shown) < 1000, f"{len(shown)} characters: the reply was not cut short"
    assert reply.locator(".meta").text_content().endswith("\u00b7 stopped")
    assert "error" not in (reply.get_attribute("class") or "")

    # The server let go of the request within seconds: no slot in use, nothing waiting, no tokens after it.
    deadline = time.monotonic() + 5
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    settled = server.health()
    assert (settled["active"], settled["waiting"]) == (0, 0)
    time.sleep(0.3)
    assert server.health()["decoded_tokens"] == settled["decoded_tokens"] < 1000

    # What had arrived is saved as the reply, and the one slot answers the next message.
    conversation_id = page.evaluate("location.hash.slice(1)")
    messages = saved(server, conversation_id).json()["messages"]
    assert [(m["role"], m["content"], m["model"]) for m in messages] == [
        ("user", "once upon a time", None),
        ("assistant", shown, "long"),
    ]
    page.fill("#max-tokens", "5")
    send(page, "and then")
    last = page.locator("#messages .message.assistant").last
    assert len(last.locator(".content").text_content()) == 5
    assert not last.locator(".meta").text_content().endswith("stopped")


def test_a_conversation_renamed_from_the_list_keeps_its_name(page, tuned_server):
    open_chat(page, tuned_server.url + "/")
    conversation_id = ask(page, "Capital of France?")
    item = listed(page, conversation_id)
    expect(item.locator(".open")).to_have_text("Capital of France?")

    item.get_by_role("button", name="Rename").click()
    title = item.get_by_role("textbox", name="New title")
    expect(title).to_be_focused()
    expect(title).to_have_value("Capital of France?")
    title.fill("  Geography quiz  ")
    title.press("Enter")
    expect(item.locator(".open")).to_have_text("Geography quiz")  # trimmed, and the list drawn again
    assert saved(tuned_server, conversation_id).json()["title"] == "Geography quiz"

    # Escape gives up a rename: the title stays, the server is not asked.
    item.get_by_role("button", name="Rename").click()
    item.get_by_role("textbox", name="New title").fill("Something else")
    item.get_by_role("textbox", name="New title").press("Escape")
    expect(item.locator(".open")).to_have_text("Geography quiz")

    reload(page)
    expect(listed(page, conversation_id).locator(".open")).to_have_text("Geography quiz")
    expect(listed(page, conversation_id)).to_have_class("conversation active")
    assert bubbles(page) == [("user", "Capital of France?"), ("assistant", "Paris.")]
    listing = httpx.get(tuned_server.url + "/api/conversations", timeout=10).json()["data"]
    assert [(c["id"], c["title"]) for c in listing] == [(conversation_id, "Geography quiz")]


def test_a_conversation_exports_as_json_with_its_messages(page, tuned_server):
    open_chat(page, tuned_server.url + "/")
    conversation_id = ask(page, "Capital of France?")
    ask(page, "Colour of grass?")
    with page.expect_download() as download_info:
        listed(page, conversation_id).get_by_role("button", name="Export as JSON").click()
    download = download_info.value
    assert download.suggested_filename == f"kiln-conversation-{conversation_id}.json"
    exported = json.loads(Path(download.path()).read_text(encoding="utf-8"))
    assert (exported["format"], exported["format_version"]) == ("kiln-conversation", 1)
    assert (exported["id"], exported["title"]) == (conversation_id, "Capital of France?")
    assert [(m["role"], m["content"], m["model"]) for m in exported["messages"]] == [
        ("user", "Capital of France?", None),
        ("assistant", "Paris.", "tuned"),
        ("user", "Colour of grass?", None),
        ("assistant", "Green.", "tuned"),
    ]
    assert page.locator("#status").is_hidden()  # no "Could not export"


def test_a_deleted_conversation_leaves_the_list_for_good(page, tuned_server):
    open_chat(page, tuned_server.url + "/")
    first = ask(page, "Capital of France?")
    page.click("#new-chat")
    second = ask(page, "Colour of grass?")
    expect(page.locator("#conversations .conversation")).to_have_count(2)
    asked: list[str] = []

    def answer_confirm(accept: bool):
        def handle(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return handle

    # Cancelling the confirmation deletes nothing.
    page.once("dialog", answer_confirm(False))
    listed(page, first).get_by_role("button", name="Delete").click()
    assert asked == ['Delete "Capital of France?" and its messages?']
    expect(page.locator("#conversations .conversation")).to_have_count(2)
    assert saved(tuned_server, first).status_code == 200

    # A conversation that is not open: gone from the list, the open one stays as it is.
    page.once("dialog", answer_confirm(True))
    listed(page, first).get_by_role("button", name="Delete").click()
    expect(listed(page, first)).to_have_count(0)
    assert saved(tuned_server, first).status_code == 404
    assert bubbles(page) == [("user", "Colour of grass?"), ("assistant", "Green.")]
    reload(page)
    expect(listed(page, second)).to_have_class("conversation active")
    expect(listed(page, first)).to_have_count(0)

    # The open one: gone, and the page is a new chat, which a reload does not bring back.
    page.once("dialog", answer_confirm(True))
    listed(page, second).get_by_role("button", name="Delete").click()
    expect(page.locator("#conversations .conversation")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    assert page.evaluate("location.hash") == "" and bubbles(page) == []
    reload(page)
    expect(page.locator("#empty")).to_be_visible()
    assert page.locator("#conversations .conversation").count() == 0 and bubbles(page) == []
    assert httpx.get(tuned_server.url + "/api/conversations", timeout=10).json()["data"] == []
    assert saved(tuned_server, second).status_code == 404


def api_answer(server: LiveServer, model: str, question: str, max_tokens: int) -> str:
    """What /v1/chat/completions answers the page's request, whole: the one user message, greedy."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "top_p": 0.95,  # the page's defaults
        "known_words": True,
        "max_tokens": max_tokens,
        "truncate_history": True,
    }
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("tuned", "label"), [("tuned", "tuned"), ("lora", "lora \u00b7 adapter")])
def test_compare_shows_the_base_and_the_tuned_answer_side_by_side(
    page, live_server, served_runs, tmp_path, tuned, label
):
    # runs/tuned serves tuned and the base it was tuned from; runs/lora/best serves its base with the adapter.
    served = served_runs["tuned"].parent if tuned == "tuned" else served_runs["lora"]
    server = live_server(served, "--db", tmp_path / "chat.db")
    question = "Capital of France?"
    open_chat(page, server.url + "/")
    page.select_option("#model", tuned)
    page.check("#compare")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "30")
    send(page, question)

    row = page.locator("#messages .replies.compare")
    expect(row).to_have_count(1)
    replies = row.locator(".message.assistant")
    expect(replies).to_have_count(2)
    assert replies.locator(".meta").all_text_contents() == ["base", label]
    texts = replies.locator(".content").all_text_contents()
    assert texts == [api_answer(server, "base", question, 30), api_answer(server, tuned, question, 30)]
    assert texts[0] != texts[1], "both sides answered alike: the tuned side did not use its tuning"
    if tuned == "tuned":
        assert texts[1] == "Paris."
    assert page.locator("#messages .message.error").count() == 0

    # Both replies are saved in the order shown, so a reload draws the same two columns.
    conversation_id = page.evaluate("location.hash.slice(1)")
    messages = saved(server, conversation_id).json()["messages"]
    assert [(m["role"], m["model"], m["content"]) for m in messages] == [
        ("user", None, question),
        ("assistant", "base", texts[0]),
        ("assistant", tuned, texts[1]),
    ]
    reload(page)
    replies = page.locator("#messages .replies.compare .message.assistant")
    assert replies.locator(".meta").all_text_contents() == ["base", label]
    assert replies.locator(".content").all_text_contents() == texts
