"""The web chat's saved conversations: one SQLite file (WAL mode) that outlives the server, shared by
its request threads. Every query is parameterised; text from the page never becomes SQL."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.errors import ConfigError

ROLES = ("system", "user", "assistant")
DEFAULT_TITLE = "New chat"
EXPORT_FORMAT = "kiln-conversation"

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    model TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_in_order ON messages (conversation_id, id);
"""


class ConversationStore:
    """Conversations and their messages in the SQLite file at `path` (created when missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection for all threads: sqlite3 wants its calls one at a time
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys = ON")  # off by default, and ON DELETE CASCADE needs it
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"{self.path}: cannot be used as the conversation database ({e}); "
                "give --db a new file name (it is created) or move this file away"
            ) from None
        except OSError as e:
            raise ConfigError(
                f"{self.path}: cannot create the conversation database there ({e.strerror or e}); "
                "give --db another path"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def create(self, title: str | None = None, model: str | None = None) -> dict:
        """A new, empty conversation (titled "New chat" unless `title` is given)."""
        now = time.time()
        conversation = {"id": uuid.uuid4().hex, "title": title or DEFAULT_TITLE, "model": model}
        conversation.update(created=now, updated=now)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, title, model, created, updated) "
                "VALUES (:id, :title, :model, :created, :updated)",
                conversation,
            )
        return conversation

    def list(self) -> list[dict]:
        """Every conversation without its messages, the most recently updated first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
                "FROM conversations c ORDER BY c.updated DESC, c.rowid DESC"
            ).fetchall()
        return [dict(row) for row in rows]

    def get(self, conversation_id: str) -> dict | None:
        """The conversation with its messages in order under "messages", or None when there is none by that id."""
        with self._lock:
            row = self._db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None:
                return None
            messages = self._db.execute(
                "SELECT id, role, content, model, created FROM messages WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return {**dict(row), "messages": [dict(message) for message in messages]}

    def rename(self, conversation_id: str, title: str) -> bool:
        """Give the conversation a new title; False when there is none by that id."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE conversations SET title = ?, updated = ? WHERE id = ?", (title, time.time(), conversation_id)
            ).rowcount
        return changed == 1

    def delete(self, conversation_id: str) -> bool:
        """Delete the conversation and (by the cascade) its messages; False when there is none by that id."""
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount
        return deleted == 1

    def add_message(self, conversation_id: str, role: str, content: str, model: str | None = None) -> dict | None:
        """Append a message (role system, user or assistant; `model` says who wrote an assistant's); None when
        there is no conversation by that id."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        now = time.time()
        with self._transaction() as db:
            touched = db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id)).rowcount
            if touched != 1:
                return None
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, model, created) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, model, now),
            )
        return {"id": cursor.lastrowid, "role": role, "content": content, "model": model, "created": now}

    def export(self, conversation_id: str) -> dict | None:
        """The whole conversation as plain JSON-ready data, marked with its format; None when there is none."""
        conversation = self.get(conversation_id)
        if conversation is None:
            return None
        return {"format": EXPORT_FORMAT, "format_version": 1, "exported": time.time(), **conversation}
