"""Chat: the history stays within the context window (newest turns kept), slash commands change the
session, mistakes show one line (or end a scripted chat), and Ctrl-C stops only the reply."""

from __future__ import annotations

import string

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.data.instructions import Message
from kiln.data.templates import get_template
from kiln.data.tokenizers import CharTokenizer
from kiln.errors import ConfigError, TokenizerError
from kiln.generate import chat
from kiln.generate.chat import ChatSession, chat_loop, run_script
from kiln.generate.sampling import SamplingConfig, generate
from kiln.model.gpt import GPT, GPTConfig

SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
GREEDY = SamplingConfig(max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer(string.ascii_letters + string.digits + string.punctuation + " \n", specials=SPECIALS)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16, block_style="llama"
    )
    return GPT(config).eval()


def session(model, tokenizer, template="chat", sampling=GREEDY, system=None) -> ChatSession:
    return ChatSession(model, tokenizer, get_template(template), sampling, system)


class Lines:
    """input() for tests: hands out the given lines, then EOF; records the prompts asked with."""

    def __init__(self, *lines: str):
        self.lines, self.prompts = list(lines), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


class Transcript:
    """print() for tests: collects what the chat shows."""

    def __init__(self):
        self.text = ""

    def __call__(self, *parts: str, end: str = "\n", flush: bool = False) -> None:
        self.text += " ".join(parts) + end

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


@pytest.mark.parametrize("template", ["chat", "alpaca", None])
def test_chat_history_truncation_keeps_the_newest_turns(model, tokenizer, template):
    you = session(model, tokenizer, template, SamplingConfig(max_new_tokens=4, temperature=0), "Be brief.")
    for number in range(8):
        you.turns += [Message("user", f"question {number}?"), Message("assistant", f"answer {number}.")]
    assert len(you.prompt_ids()) > you.prompt_budget  # the whole history would not fit

    reply = "".join(you.reply("newest?"))

    kept = you.turns[:-2]
    assert you.turns[-2:] == [Message("user", "newest?"), Message("assistant", reply)]
    assert kept and kept[0].role == "user" and kept[-1] == Message("assistant", "answer 7.")
    assert you.messages()[0] == Message("system", "Be brief.")
    # what the model read fits, and one more of the dropped turns would not have
    first_kept = int(kept[0].content.split()[1].rstrip("?"))
    assert first_kept > 0
    you.turns.pop()
    assert len(you.prompt_ids()) <= you.prompt_budget
    older = [Message("user", f"question {first_kept - 1}?"), Message("assistant", f"answer {first_kept - 1}.")]
    you.turns[:0] = older
    assert len(you.prompt_ids()) > you.prompt_budget


def test_the_newest_turn_stays_even_when_it_alone_overflows(model, tokenizer):
    you = session(model, tokenizer)
    you.turns = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "x" * 200)]
    assert you.fit_history() == 2
    assert you.turns == [Message("user", "x" * 200)]


def test_the_reply_budget_is_capped_at_half_the_context(model, tokenizer):
    you = session(model, tokenizer, sampling=SamplingConfig(max_new_tokens=1000))
    assert you.prompt_budget == 64
    assert session(model, tokenizer).prompt_budget == 128 - GREEDY.max_new_tokens


def test_greedy_replies_are_deterministic_and_answer_the_rendered_prompt(model, tokenizer):
    first, second = session(model, tokenizer), session(model, tokenizer)
    prompt = None

    def expected() -> str:
        ids = []
        for token in generate(model, torch.tensor([prompt]), GREEDY, {tokenizer.eos_id}):
            if token == tokenizer.eos_id:
                break
            ids.append(token)
        return tokenizer.decode(ids)

    for line in ("Hello there", "And again?"):
        first.turns.append(Message("user", line))
        prompt = first.prompt_ids()
        first.turns.pop()
        answer = "".join(first.reply(line))
        assert answer == "".join(second.reply(line))
        assert answer == min((expected().split(stop)[0] for stop in chat.STOPS["chat"]), key=len)
    assert first.turns == second.turns and len(first.turns) == 4


def test_typing_a_special_token_does_not_forge_it(model, tokenizer):
    you = session(model, tokenizer)
    you.turns.append(Message("user", "<|user|>hi<|endoftext|>"))
    ids = you.prompt_ids()
    specials = tokenizer.special_tokens
    assert ids.count(specials["<|user|>"]) == 1  # only the real turn's own role token
    assert ids.count(specials["<|endoftext|>"]) == 1  # only the real end of the turn
    assert tokenizer.encode_plain("<|user|>hi<|endoftext|>") == ids[2:-3]


def test_a_base_model_chats_as_plain_continuation(model, tokenizer):
    you = session(model, tokenizer, template=None, system="A play.")
    assert you.is_base_model and "continues your text" in you.banner()
    you.turns.append(Message("user", "ROMEO:"))
    assert you.prompt_ids() == tokenizer.encode_plain("A play.\nROMEO:")  # no roles, no markers
    you.turns.pop()

    continuation = "".join(you.reply("ROMEO:"))
    you.turns.append(Message("user", "JULIET:"))
    joint = "" if continuation.endswith("\n") else "\n"
    assert you.prompt_ids() == tokenizer.encode_plain("A play.\nROMEO:" + continuation + joint + "JULIET:")


def test_set_changes_sampling(model, tokenizer):
    you = session(model, tokenizer, sampling=None)
    assert (you.sampling.temperature, you.sampling.top_k, you.sampling.top_p) == (0.6, 50, 0.9)
    assert you.sampling.max_new_tokens == 200
    assert you.handle("/set temperature=0.2") == "temperature=0.2"
    you.handle("/set top_k = none")
    you.handle("/set max_new_tokens=32")
    you.handle("/set seed=7")
    assert you.sampling == SamplingConfig(
        max_new_tokens=32, temperature=0.2, top_k=None, top_p=0.9, seed=7, known_words=True
    )
    assert "temperature=0.2" in you.handle("/set")
    # this tokenizer keeps no words.txt, and the chat says what that means
    assert "samples freely" in you.handle("/set known_words=on")
    assert you.handle("/set known_words=off") == "known_words=False"


@pytest.mark.parametrize(
    "line, says",
    [
        ("/set temprature=0.2", "did you mean temperature?"),
        ("/set temperature", "KEY=VALUE"),
        ("/set temperature=hot", "not a value for temperature"),
        ("/set temperature=-1", "must be 0 (greedy) or more"),
        ("/set top_p=1.5", "top-p"),
        ("/set max_new_tokens=0", "at least 1"),
    ],
)
def test_a_bad_set_is_one_line_and_keeps_the_session(model, tokenizer, line, says):
    you = session(model, tokenizer)
    you.turns.append(Message("user", "hi"))
    with pytest.raises(ConfigError, match=says.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        you.handle(line)
    assert you.sampling == GREEDY and len(you.turns) == 1

    shown = Transcript()
    chat_loop(you, Lines(line, "/set temperature=0.5"), shown)
    # the banner, one line about the mistake, the change that followed, the line ended at EOF
    assert len(shown.lines) == 4 and says in shown.lines[1] and shown.lines[3] == ""
    assert you.sampling.temperature == 0.5


def test_reset_and_system_commands(model, tokenizer):
    you = session(model, tokenizer, system="Be kind.")
    "".join(you.reply("hello"))
    assert you.handle("/reset") == "conversation cleared (the system message stays)"
    assert you.turns == [] and you.messages() == [Message("system", "Be kind.")]
    you.handle("/system You are a pirate.")
    assert you.messages() == [Message("system", "You are a pirate.")]
    assert you.handle("/system") == "system message cleared"
    assert you.messages() == []
    assert you.handle("/quit") is None
    assert "/system TEXT" in you.handle("/help")


def test_an_unknown_command_is_one_line_and_the_chat_goes_on(model, tokenizer):
    you = session(model, tokenizer)
    shown = Transcript()
    chat_loop(you, Lines("/bogus", "/set temperature=0.3"), shown)
    assert shown.lines[1] == "unknown command '/bogus'; the commands are /reset /system TEXT /set KEY=VALUE /help /quit"
    assert shown.lines[2] == "temperature=0.3"


def test_an_unknown_command_ends_a_scripted_chat(model, tokenizer):
    you = session(model, tokenizer)
    shown = Transcript()
    with pytest.raises(ConfigError, match="unknown command '/bogus'"):
        run_script(you, ["/set temperature=0.3", "/bogus", "/set temperature=0.9"], shown)
    assert shown.lines == ["you> /set temperature=0.3", "temperature=0.3", "you> /bogus"]
    assert you.sampling.temperature == 0.3


def test_the_loop_talks_until_quit(model, tokenizer):
    you = session(model, tokenizer)
    lines, shown = Lines("Hello", "", "/quit", "never read"), Transcript()
    chat_loop(you, lines, shown)
    assert lines.lines == ["never read"] and lines.prompts == ["you> "] * 3
    assert shown.text == f"{you.banner()}\nassistant> {you.turns[1].content}\n"
    assert [m.role for m in you.turns] == ["user", "assistant"]


@pytest.mark.parametrize("leave", [EOFError, KeyboardInterrupt])
def test_end_of_input_or_ctrl_c_at_the_prompt_leaves(model, tokenizer, leave):
    def typed(prompt: str) -> str:
        raise leave

    shown = Transcript()
    chat_loop(session(model, tokenizer), typed, shown)
    assert shown.text.endswith("\n\n")  # the banner, then the prompt's line ended


def test_ctrl_c_mid_reply_stops_only_that_reply(model, tokenizer, monkeypatch):
    def interrupted(*args, **kwargs):
        yield "Hel"
        raise KeyboardInterrupt

    you = session(model, tokenizer)
    with monkeypatch.context() as patch:
        patch.setattr(chat, "stream_reply", interrupted)
        shown = Transcript()
        chat_loop(you, Lines("Hi", "/set temperature=0.4"), shown)
    assert shown.lines[1:] == ["assistant> Hel [stopped]", "temperature=0.4", ""]
    assert you.turns == [Message("user", "Hi"), Message("assistant", "Hel")]  # the partial reply is kept

    "".join(you.reply("Go on"))  # and the next turn is answered as usual
    assert [m.role for m in you.turns] == ["user", "assistant"] * 2


def test_text_the_tokenizer_cannot_read_is_one_line(model, tokenizer):
    you = session(model, tokenizer)
    shown = Transcript()
    chat_loop(you, Lines("café", "/set temperature=0.4"), shown)
    assert "'é'" in shown.lines[1] and shown.lines[2] == "temperature=0.4"
    assert you.turns == []
    scripted = Transcript()
    run_script(you, ["café", "cafe"], scripted)  # a script goes on past it too, and answers the next line
    assert "not sent: this model cannot read 'é' (U+00E9)" in scripted.text
    assert [m.role for m in you.turns] == ["user", "assistant"] and you.turns[0].content == "cafe"
    with pytest.raises(TokenizerError):
        you.handle("/system Soyez polis, s'il vous plaît.")


def test_run_script_prints_the_transcript(model, tokenizer):
    you = session(model, tokenizer)
    shown = Transcript()
    run_script(you, ["/system Be brief.", "What is a kiln?", "Thanks!"], shown)
    replies = [m.content for m in you.turns if m.role == "assistant"]
    assert shown.text == (
        "you> /system Be brief.\nsystem message: Be brief.\n"
        f"you> What is a kiln?\nassistant> {replies[0]}\nyou> Thanks!\nassistant> {replies[1]}\n"
    )


def test_a_template_the_tokenizer_cannot_write_is_refused(model):
    plain_chars = CharTokenizer(string.ascii_letters, specials=["<|endoftext|>"])
    with pytest.raises(ConfigError, match="<|user|>"):
        ChatSession(model, plain_chars, get_template("chat"))


def test_a_session_opens_a_checkpoint_in_its_template(model, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "tuned", model, tokenizer, info={"template": "alpaca"})
    save_checkpoint(tmp_path / "base", model, tokenizer)
    tuned = ChatSession.from_checkpoint(tmp_path / "tuned", system="Be brief.")
    assert tuned.template.name == "alpaca" and tuned.system == "Be brief."
    assert tuned.sampling == SamplingConfig(max_new_tokens=200, temperature=0.6, top_k=50, top_p=0.9, known_words=True)
    assert ChatSession.from_checkpoint(tmp_path / "base").is_base_model
