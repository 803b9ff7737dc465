"""Prompt templates: how a conversation is written out for the model, and which tokens carry loss.

A template renders messages into `Piece`s: text (encoded with `encode_plain`, so text can never forge a
special token) or a special token by name, each marked trainable or not. Only the assistant's turns and
the EOS that ends them are trainable, so the model learns to answer and to stop, not to write prompts.
The template's name is saved with a fine-tuned model, so `sample`, `chat` and `evaluate` use the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.data.instructions import Message
from kiln.data.tokenizers import EOS, Tokenizer
from kiln.errors import ConfigError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


@dataclass(frozen=True)
class Piece:
    text: str = ""
    special: str | None = None  # a special token's name, instead of text
    trainable: bool = False


class Template:
    name = ""
    special_tokens: tuple[str, ...] = (EOS,)  # what the tokenizer must have
    # The same rendering as a Jinja chat template, for transformers' apply_chat_template (see export).
    jinja: str | None = None

    def render(self, messages: list[Message], generation_prompt: bool = False) -> list[Piece]:
        """Pieces for `messages`; with `generation_prompt`, end where the model's next answer starts."""
        raise NotImplementedError


class AlpacaTemplate(Template):
    """Stanford Alpaca's template, as LLMs-from-scratch ch. 7 writes it; a system message replaces the
    preamble, and later turns repeat the Instruction/Response headings."""

    name = "alpaca"
    jinja = (
        "{%- set ns = namespace(preamble='" + ALPACA_PREAMBLE + "', turns=messages) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.preamble = messages[0]['content'] -%}{%- set ns.turns = messages[1:] -%}"
        "{%- endif -%}"
        "{%- for message in ns.turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- ('\\n\\n' if not loop.first else ns.preamble + '\\n\\n') + '### Instruction:\\n' + message['content'] -}}"
        "{%- if message.get('context') -%}{{- '\\n\\n### Input:\\n' + message['context'] -}}{%- endif -%}"
        "{{- '\\n\\n### Response:\\n' -}}"
        "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def render(self, messages: list[Message], generation_prompt: bool = False) -> list[Piece]:
        pieces, preamble = [], ALPACA_PREAMBLE
        if messages and messages[0].role == "system":
            preamble, messages = messages[0].content, messages[1:]
        for number, message in enumerate(messages):
            if message.role == "user":
                text = ("\n\n" if number else preamble + "\n\n") + f"### Instruction:\n{message.content}"
                if message.context:
                    text += f"\n\n### Input:\n{message.context}"
                pieces.append(Piece(text + "\n\n### Response:\n"))
            else:
                pieces += [Piece(message.content, trainable=True), Piece(special=EOS, trainable=True)]
        return pieces


class ChatTemplate(Template):
    """Role special tokens: `<|user|>` newline text, EOS; `<|assistant|>` newline answer, EOS."""

    name = "chat"
    special_tokens = (EOS, *ROLE_TOKENS.values())
    jinja = (
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}"
        "{%- if message.get('context') -%}{{- '\\n\\n' + message['context'] -}}{%- endif -%}"
        "{{- eos_token -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    )

    def render(self, messages: list[Message], generation_prompt: bool = False) -> list[Piece]:
        pieces = []
        for message in messages:
            content = message.content + (f"\n\n{message.context}" if message.context else "")
            answer = message.role == "assistant"
            pieces += [
                Piece(special=ROLE_TOKENS[message.role]),
                Piece("\n"),
                Piece(content, trainable=answer),
                Piece(special=EOS, trainable=answer),
            ]
        if generation_prompt:
            pieces += [Piece(special=ROLE_TOKENS["assistant"]), Piece("\n")]
        return pieces


class PlainTemplate(Template):
    """No template: a base model continues the text it is given, one message after another."""

    name = "plain"
    special_tokens = ()

    def render(self, messages: list[Message], generation_prompt: bool = False) -> list[Piece]:
        return [Piece(("\n" if i else "") + m.content, trainable=m.role == "assistant") for i, m in enumerate(messages)]


TEMPLATES: dict[str, Template] = {t.name: t for t in (AlpacaTemplate(), ChatTemplate(), PlainTemplate())}


def get_template(name: str | None) -> Template:
    if name is None:
        return TEMPLATES["plain"]
    if name not in TEMPLATES:
        raise ConfigError(f"template '{name}': choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class Encoded:
    ids: list[int]
    trainable: list[bool]  # per token: does predicting this token count in the loss
    truncated: bool = False

    def inputs_and_labels(self, prompt_loss: bool = False) -> tuple[list[int], list[int]]:
        """Model inputs and next-token labels (-100 where no loss is taken)."""
        labels = [t if prompt_loss or keep else -100 for t, keep in zip(self.ids[1:], self.trainable[1:], strict=True)]
        return self.ids[:-1], labels


def encode_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> Encoded:
    ids: list[int] = []
    trainable: list[bool] = []
    specials = tokenizer.special_tokens
    for piece in pieces:
        if piece.special is not None:
            if piece.special not in specials:
                raise ConfigError(f"the tokenizer has no {piece.special} token, which the template needs")
            new = [specials[piece.special]]
        else:
            new = tokenizer.encode_plain(piece.text)
        ids += new
        trainable += [piece.trainable] * len(new)
    return Encoded(ids, trainable)


def fit_to_context(encoded: Encoded, max_tokens: int) -> Encoded:
    """Cut an example to `max_tokens`: the prompt first, from its start (the answer needs the tokens just
    before it), then the end of the answer."""
    excess = len(encoded.ids) - max_tokens
    if excess <= 0:
        return encoded
    first_answer = next((i for i, t in enumerate(encoded.trainable) if t), len(encoded.ids))
    from_prompt = min(excess, max(first_answer - 1, 0))
    ids, trainable = encoded.ids[from_prompt:], encoded.trainable[from_prompt:]
    return Encoded(ids[:max_tokens], trainable[:max_tokens], truncated=True)
