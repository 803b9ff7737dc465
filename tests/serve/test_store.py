"""The conversation store: conversations and messages in one SQLite file that a restarted server (a second
store on the same path) reads back, deleted with their messages, safe from SQL in titles and text, shared
by threads; a file that is not SQLite is one clear error."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from kiln.errors import ConfigError
from kiln.serve.store import ConversationStore


@pytest.fixture
def store(tmp_path):
    store = ConversationStore(tmp_path / "chat.db")
    yield store
    store.close()


def test_a_conversation_keeps_its_messages_in_order(store):
    conversation = store.create(model="base")
    assert len(conversation["id"]) == 32 and conversation["title"] == "New chat" and conversation["model"] == "base"
    store.add_message(conversation["id"], "system", "Be brief.")
    store.add_message(conversation["id"], "user", "hello")
    reply = store.add_message(conversation["id"], "assistant", "hi there", model="tuned")
    assert reply["role"] == "assistant" and reply["model"] == "tuned" and isinstance(reply["id"], int)

    got = store.get(conversation["id"])
    assert [(m["role"], m["content"], m["model"]) for m in got["messages"]] == [
        ("system", "Be brief.", None),
        ("user", "hello", None),
        ("assistant", "hi there", "tuned"),
    ]
    assert got["updated"] >= got["created"]


def test_list_puts_the_most_recently_updated_first(store):
    first, second = store.create(title="first"), store.create(title="second")
    assert [c["title"] for c in store.list()] == ["second", "first"]
    store.add_message(first["id"], "user", "back to the first one")
    listed = store.list()
    assert [c["title"] for c in listed] == ["first", "second"]
    assert listed[0]["message_count"] == 1 and "messages" not in listed[0]
    assert second["id"] in {c["id"] for c in listed}


def test_rename_delete_and_unknown_ids(store):
    conversation = store.create(title="old")
    assert store.rename(conversation["id"], "new") is True
    assert store.get(conversation["id"])["title"] == "new"
    assert store.get("nope") is None
    assert store.rename("nope", "x") is False
    assert store.delete("nope") is False
    assert store.add_message("nope", "user", "x") is None
    assert store.export("nope") is None
    with pytest.raises(ValueError, match="role must be one of"):
        store.add_message(conversation["id"], "robot", "x")


def test_delete_takes_the_messages_with_it(store, tmp_path):
    conversation = store.create()
    store.add_message(conversation["id"], "user", "hello")
    kept = store.create()
    store.add_message(kept["id"], "user", "still here")
    assert store.delete(conversation["id"]) is True
    assert store.get(conversation["id"]) is None
    with sqlite3.connect(tmp_path / "chat.db") as db:
        rows = db.execute("SELECT conversation_id, content FROM messages").fetchall()
    assert rows == [(kept["id"], "still here")]


def test_a_second_store_on_the_same_file_sees_everything_as_after_a_restart(tmp_path):
    path = tmp_path / "chat.db"
    first = ConversationStore(path)
    conversation = first.create(title="survives")
    first.add_message(conversation["id"], "user", "remember me")
    first.close()

    again = ConversationStore(path)
    assert [c["title"] for c in again.list()] == ["survives"]
    assert again.get(conversation["id"])["messages"][0]["content"] == "remember me"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_sql_in_titles_and_text_is_stored_as_text(store):
    attack = "'); DROP TABLE conversations;--"
    conversation = store.create(title=attack, model=attack)
    store.add_message(conversation["id"], "user", attack, model="x'); DELETE FROM messages;--")
    store.rename(conversation["id"], attack + " again")
    got = store.get(conversation["id"])
    assert got["title"] == attack + " again" and got["model"] == attack
    assert got["messages"][0]["content"] == attack
    assert store.get("' OR '1'='1") is None
    assert store.delete("' OR '1'='1") is False
    assert len(store.list()) == 1


def test_export_is_everything_as_json(store):
    conversation = store.create(title="to export", model="base")
    store.add_message(conversation["id"], "user", "<b>hi</b> \u00e9\u4e2d")
    exported = json.loads(json.dumps(store.export(conversation["id"])))
    assert exported["format"] == "kiln-conversation" and exported["format_version"] == 1
    assert exported["id"] == conversation["id"] and exported["title"] == "to export"
    assert exported["messages"][0]["content"] == "<b>hi</b> \u00e9\u4e2d"


def test_threads_share_one_store(store):
    conversation = store.create()
    errors = []

    def write(worker: int) -> None:
        try:
            for n in range(25):
                store.add_message(conversation["id"], "user", f"{worker}:{n}")
                store.list()
        except Exception as e:  # noqa: BLE001 (collected, then asserted on in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.get(conversation["id"])["messages"]) == 200


def test_a_file_that_is_not_sqlite_is_one_line_naming_it(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(ConfigError) as caught:
        ConversationStore(notes)
    message = str(caught.value)
    assert str(notes) in message and "--db" in message and "\n" not in message
    assert notes.read_text().startswith("these are my notes")  # left as it was


def test_a_folder_as_the_database_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--db"):
        ConversationStore(tmp_path)
