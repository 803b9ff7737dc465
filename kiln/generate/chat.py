"""Multi-turn chat with a checkpoint: a session that keeps the conversation within the context window,
its slash commands, and the terminal loop behind `kiln chat`.

A fine-tuned model sees the conversation written out in its prompt template. A base model (no template)
sees one running text, your lines and its own continuations one after another, so it continues what you
write. When the conversation outgrows the context window the oldest turns are dropped whole, so the
model never sees half a turn; the system message always stays.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Callable, Generator, Iterable

from kiln.checkpoint import load_checkpoint
from kiln.config import parse_value
from kiln.data.instructions import Message
from kiln.data.templates import Piece, Template, encode_pieces, get_template
from kiln.data.tokenizers import Tokenizer
from kiln.data.tokenizers.char import UnknownCharacter
from kiln.errors import ConfigError, KilnError, TokenizerError
from kiln.generate.chat_defaults import CHAT_SAMPLING
from kiln.generate.sampling import SamplingConfig, stream_reply
from kiln.model.gpt import GPT
from kiln.model.packed import pack_for_decoding


class UnreadableMessage(TokenizerError):
    """A message with a character the model's vocabulary lacks: it is not sent, the chat goes on."""


SETTINGS = typing.get_type_hints(SamplingConfig)  # what /set can change, with each value's type
COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message; /system alone clears it",
    "/set KEY=VALUE": "change a sampling setting: " + ", ".join(SETTINGS) + "; /set alone shows them",
    "/help": "show this help",
    "/quit": "leave (so do Ctrl-D and Ctrl-C at the prompt)",
}
# An under-trained model may start writing the next turn instead of ending its answer with EOS.
STOPS = {"alpaca": ["\n\n### Instruction:"], "chat": ["<|user|>", "<|system|>", "<|assistant|>"]}
USER_PROMPT = "you> "


class RunningText(Template):
    """How a base model chats: the system text and each user line start a new line of one running
    text, and the model's replies continue it directly."""

    name = "plain"
    special_tokens = ()

    def render(self, messages: list[Message], generation_prompt: bool = False) -> list[Piece]:
        """Pieces of the running text; the generation prompt adds nothing, the reply just goes on."""
        pieces, text = [], ""
        for message in messages:
            answer = message.role == "assistant"
            start = "\n" if not answer and text and not text.endswith("\n") else ""
            pieces.append(Piece(start + message.content, trainable=answer))
            text += start + message.content
        return pieces


class ChatSession:
    """A conversation with one model: the system message, the turns so far, and the sampling settings
    (default CHAT_SAMPLING: temperature 0.6, top-k 50, top-p 0.9, at most 200 new tokens a reply, known
    words)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        template: Template,
        sampling: SamplingConfig | None = None,
        system: str | None = None,
        stop: list[str] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = RunningText() if template.name == "plain" else template
        missing = [s for s in self.template.special_tokens if s not in tokenizer.special_tokens]
        if missing:
            raise ConfigError(f"the tokenizer has no {', '.join(missing)}, which the {template.name} template needs")
        self.sampling = sampling or SamplingConfig(**CHAT_SAMPLING)
        self.stop = STOPS.get(self.template.name, []) if stop is None else stop
        self.system: str | None = None
        self.set_system(system)
        self.turns: list[Message] = []  # user and assistant messages, oldest first

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | os.PathLike,
        system: str | None = None,
        sampling: SamplingConfig | None = None,
        device: str = "cpu",
        precision: str | None = None,
    ) -> ChatSession:
        """A session with the model in a checkpoint folder, in the template it was fine-tuned with
        (none for a base model); `precision` packs its weights for decoding (kiln.model.packed)."""
        checkpoint = load_checkpoint(folder, device=device)
        if checkpoint.tokenizer is None:
            raise KilnError(f"{folder}: has no tokenizer/ folder, so the model's output cannot be turned into text")
        template = get_template(checkpoint.info.get("template"))
        model = checkpoint.model if precision is None else pack_for_decoding(checkpoint.model, precision)
        return cls(model, checkpoint.tokenizer, template, sampling, system)

    @property
    def is_base_model(self) -> bool:
        return self.template.name == "plain"

    def messages(self) -> list[Message]:
        """The conversation as the template renders it: the system message (if any), then the turns."""
        return ([Message("system", self.system)] if self.system else []) + self.turns

    def prompt_ids(self) -> list[int]:
        """The token ids the model reads before its next reply."""
        return encode_pieces(self.template.render(self.messages(), generation_prompt=True), self.tokenizer).ids

    @property
    def prompt_budget(self) -> int:
        """Most prompt tokens that leave room for a reply; the same room that stream_reply leaves."""
        block = self.model.config.block_size
        return max(block - self.sampling.max_new_tokens, block // 2)

    def fit_history(self) -> int:
        """Drop the oldest whole turns (a user message and its replies) until the prompt fits the
        budget, keeping the system message and the newest user message; returns how many messages went."""
        dropped = 0
        while len(self.prompt_ids()) > self.prompt_budget:
            newer = next((i for i, m in enumerate(self.turns) if i > 0 and m.role == "user"), None)
            if newer is None:
                break  # only the newest turn is left; stream_reply cuts what still overflows
            del self.turns[:newer]
            dropped += newer
        return dropped

    def reply(self, text: str) -> Generator[str, None, None]:
        """Add the user's `text` and stream the model's answer. The answer joins the history when the
        stream ends, or as far as it got when the stream is closed or interrupted (Ctrl-C)."""
        try:
            self.tokenizer.encode_plain(text)  # before the history changes
        except UnknownCharacter as e:
            raise UnreadableMessage(
                f"not sent: this model cannot read {e.char!r} (U+{ord(e.char):04X}), a character its vocabulary "
                "lacks; say it without that character"
            ) from None
        self.turns.append(Message("user", text))
        self.fit_history()
        return self._answer()

    def _answer(self) -> Generator[str, None, None]:
        pieces: list[str] = []
        try:
            for piece in stream_reply(
                self.model, self.tokenizer, self.template, self.messages(), self.sampling, self.stop
            ):
                pieces.append(piece)
                yield piece
        finally:
            self.turns.append(Message("assistant", "".join(pieces)))

    def show_reply(self, text: str, out: Callable[..., None] = print) -> None:
        show_reply(self, text, out)

    def set_system(self, text: str | None) -> None:
        """Set the system message (None or empty: no system message)."""
        if text:
            self.tokenizer.encode_plain(text)  # a TokenizerError for characters the model cannot read
        self.system = text or None

    def set(self, assignment: str) -> str:
        """Apply `key=value` to the sampling settings and say what changed; a ConfigError when the key or
        value is wrong, leaving the settings as they were."""
        key, sep, value = (part.strip() for part in assignment.partition("="))
        if not sep or key not in SETTINGS:
            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"/set {assignment}: {hint}write /set KEY=VALUE, KEY one of {', '.join(SETTINGS)}")
        try:
            parsed = parse_value(key, value, SETTINGS[key])
        except ConfigError:
            raise ConfigError(f"/set {key}={value}: not a value for {key} (it is {self.describe(key)})") from None
        if key == "max_new_tokens" and parsed < 1:
            raise ConfigError(f"/set {key}={value}: a reply needs at least 1 new token")
        self.sampling = dataclasses.replace(self.sampling, **{key: parsed})
        if key == "known_words" and parsed and self.tokenizer.words is None:
            return f"{key}={parsed}, but this model keeps no words.txt beside its tokenizer, so it samples freely"
        return f"{key}={parsed}"

    def describe(self, key: str | None = None) -> str:
        """One sampling setting's value, or all of them as key=value pairs."""
        if key is not None:
            return str(getattr(self.sampling, key))
        return ", ".join(f"{k}={getattr(self.sampling, k)}" for k in SETTINGS)

    def handle(self, line: str) -> str | None:
        """Carry out a slash command and return the line to show, or None for /quit. An unknown command
        or a bad /set is a ConfigError naming the commands."""
        command, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if command in ("/quit", "/exit"):
            return None
        if command == "/reset":
            self.turns.clear()
            return "conversation cleared" + (" (the system message stays)" if self.system else "")
        if command == "/system":
            self.set_system(argument)
            return f"system message: {argument}" if argument else "system message cleared"
        if command == "/set":
            return self.set(argument) if argument else self.describe()
        if command == "/help":
            return "\n".join(f"{name:<15} {what}" for name, what in COMMANDS.items()) + f"\nnow: {self.describe()}"
        raise ConfigError(f"unknown command {command!r}; the commands are {' '.join(COMMANDS)}")

    def banner(self) -> str:
        """One line: what the model is, its context, and the commands."""
        kind = "a base model: it continues your text" if self.is_base_model else f"the {self.template.name} template"
        return (
            f"chat with {kind} ({self.model.config.block_size} tokens of context); "
            f"{' '.join(COMMANDS)}; Ctrl-C stops a reply"
        )


class CompareSessions:
    """`kiln chat --compare`: every question goes to each session in turn (the base first, then the
    fine-tuned model), each answer under its name; commands apply to all of them."""

    def __init__(self, sessions: dict[str, ChatSession]):
        self.sessions = sessions

    def show_reply(self, text: str, out: Callable[..., None] = print) -> None:
        for name, session in self.sessions.items():
            show_reply(session, text, out, label=f"{name}> ")

    def handle(self, line: str) -> str | None:
        shown = [session.handle(line) for session in self.sessions.values()]
        return shown[-1]

    def banner(self) -> str:
        names = " then ".join(self.sessions)
        return f"compare: each question is answered by {names}; " + next(iter(self.sessions.values())).banner()


def chat_loop(
    session: ChatSession,
    input_fn: Callable[[str], str] = input,
    out: Callable[..., None] = print,
    interactive: bool = True,
) -> None:
    """Chat line by line until /quit or the end of input (Ctrl-D, or Ctrl-C at the prompt); `out` is
    called as print is. Interactive, a mistake (unknown command, bad /set, text the tokenizer cannot
    read) shows one line and the chat goes on. Scripted (input not a terminal), each line is echoed into
    the transcript and a mistake raises its KilnError, so a bad script ends with exit status 2."""
    if interactive:
        out(session.banner())
    while True:
        try:
            line = input_fn(USER_PROMPT if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                out()  # end the prompt's line
            return
        undecodable = re.search("[\udc80-\udcff]", line)  # bytes that are not UTF-8, as stdin escapes them
        if undecodable:
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if not interactive:
            out(USER_PROMPT + line)
        if undecodable:
            out(
                f"not sent: this line is not UTF-8 text (byte 0x{ord(undecodable.group()) - 0xDC00:02X}); "
                "set the terminal, or save the file, as UTF-8"
            )
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                shown = session.handle(line)
                if shown is None:
                    return
                out(shown)
            else:
                session.show_reply(line, out)
        except UnreadableMessage as e:
            out(str(e))  # the conversation goes on, scripted or not
        except KilnError as e:
            if not interactive:
                raise
            out(str(e))


def show_reply(session: ChatSession, text: str, out: Callable[..., None] = print, label: str | None = None) -> None:
    """Stream the answer to `text` through `out` after `label`; Ctrl-C stops just this answer, keeping
    what came."""
    pieces = session.reply(text)
    out(label or ("... " if session.is_base_model else "assistant> "), end="", flush=True)
    try:
        for piece in pieces:
            out(piece, end="", flush=True)
    except KeyboardInterrupt:
        out(" [stopped]")
        return
    finally:
        pieces.close()  # records a partial answer when the loop above was left early
    out()


def run_script(session: ChatSession, lines: Iterable[str], out: Callable[..., None] = print) -> None:
    """Run fixed user lines (text and commands) through `session`, printing the transcript through `out`."""
    remaining = iter(lines)

    def next_line(prompt: str) -> str:
        line = next(remaining, None)
        if line is None:
            raise EOFError
        return line

    chat_loop(session, next_line, out, interactive=False)
