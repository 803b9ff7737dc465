"""A real `kiln serve` on a localhost port, driven by the official `openai` client: chat and text
completions whole and streamed, stop and max_tokens, temperature 0 equal to `kiln sample`, a client
that hangs up freeing its slot at once, and the full queue's 503."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from .conftest import LEARNED


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_chats_streams_and_completes(live_server, served_runs):
    server = live_server(served_runs["tuned"].parent)
    ai = client(server)
    assert [m.id for m in ai.models.list().data] == ["tuned", "base"]
    for question, answer in LEARNED:
        reply = ai.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": question}], temperature=0
        )
        assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
    stream = ai.chat.completions.create(
        model="tuned",
        messages=[{"role": "user", "content": "Capital of France?"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris."
    assert chunks[-1].usage.completion_tokens == len("Paris.")
    stopped = ai.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": "Colour of grass?"}], temperature=0, stop="ee"
    )
    assert stopped.choices[0].message.content == "Gr"
    cut = ai.completions.create(model="base", prompt="Blue", max_tokens=5, temperature=0)
    assert len(cut.choices[0].text) == 5 and cut.choices[0].finish_reason == "length"


def test_temperature_zero_equals_kiln_sample(live_server, served_runs):
    server = live_server(served_runs["base"])
    reply = client(server).completions.create(model="base", prompt="the sky", max_tokens=30, temperature=0)
    sample = subprocess.run(
        [sys.executable, "-m", "kiln", "sample", str(served_runs["base"]), "--prompt", "the sky"]
        + ["--max-new-tokens", "30", "--temperature", "0", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    assert "the sky" + reply.choices[0].text in sample.stdout


def test_a_client_that_hangs_up_frees_its_slot_within_a_token(live_server, long_checkpoint):
    server = live_server(long_checkpoint, "--max-batch", "1")
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"model": "long", "prompt": "a", "max_tokens": 1000, "stream": True},
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 10
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    settled = server.health()
    time.sleep(0.5)
    later = server.health()
    assert settled["active"] == later["active"] == 0
    assert later["decoded_tokens"] == settled["decoded_tokens"] < 1000  # nothing more was generated
    quick = client(server).completions.create(model="long", prompt="b", max_tokens=3)
    assert quick.choices[0].finish_reason == "length"  # the one slot is free again


def test_a_full_queue_answers_503(live_server, long_checkpoint):
    server = live_server(long_checkpoint, "--max-batch", "1", "--queue", "1")
    body = {"model": "long", "prompt": "a", "max_tokens": 1000, "stream": True}  # seconds of decoding each

    def read_all() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                pass

    readers = [threading.Thread(target=read_all) for _ in range(2)]  # one decodes, one waits its turn
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while (server.health()["active"], server.health()["waiting"]) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.APIStatusError) as refused:
        client(server).completions.create(model="long", prompt="c", max_tokens=3)
    assert refused.value.status_code == 503
    assert "busy" in refused.value.response.json()["error"]["message"]
    for reader in readers:
        reader.join()


def test_requests_decoded_together_get_the_text_each_gets_alone(live_server, long_checkpoint):
    """Six streamed requests at once, sampling six ways (greedy, seeded draws with top-k, top-p and a
    repetition penalty): each one's text, however its deltas were grouped, equals its text served alone."""
    server = live_server(long_checkpoint, "--max-batch", "8")
    ai = client(server)
    settings = [
        {"temperature": 0},
        {"temperature": 0, "prompt": "bb"},
        {"temperature": 1.0, "seed": 1},
        {"temperature": 1.0, "seed": 2},
        {"temperature": 0.8, "seed": 3, "top_k": 5},
        {"temperature": 1.2, "seed": 4, "top_p": 0.9, "repetition_penalty": 1.3},
    ]

    def complete(setting: dict, stream: bool) -> tuple[str, int]:
        setting = dict(setting)
        extra = {k: setting.pop(k) for k in ("top_k", "repetition_penalty") if k in setting}
        prompt = setting.pop("prompt", "a")
        reply = ai.completions.create(
            model="long", prompt=prompt, max_tokens=120, stream=stream, extra_body=extra, **setting
        )
        if not stream:
            return reply.choices[0].text, 1
        pieces = [chunk.choices[0].text for chunk in reply if chunk.choices and chunk.choices[0].text]
        return "".join(pieces), len(pieces)

    alone = [complete(setting, stream=False)[0] for setting in settings]
    together: list = [None] * len(settings)

    def run(i: int) -> None:
        together[i] = complete(settings[i], stream=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [text for text, _ in together] == alone
    assert all(len(text) == 120 for text in alone)
    assert len(set(alone[2:])) == 4  # the draws really differ, so a mix-up of generators would show


def test_known_words_hold_a_served_model_to_the_words_it_has_read(live_server, tmp_path):
    """Kiln's `known_words` field through the openai client's extra_body, on an untrained char model."""
    import torch

    from kiln.checkpoint import save_checkpoint
    from kiln.data.tokenizers import CharTokenizer
    from kiln.data.words import words_of
    from kiln.model.gpt import GPT, GPTConfig

    from .conftest import CHARS

    tokenizer = CharTokenizer(set(CHARS))
    tokenizer.words = {w: 1 for q, a in LEARNED for w in words_of(q + " " + a)} | {"a": 1, "i": 1}
    torch.manual_seed(2)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    folder = save_checkpoint(tmp_path / "words" / "best", GPT(config), tokenizer)
    ai = client(live_server(folder))
    model = ai.models.list().data[0].id
    known = set(tokenizer.words) | {"the", "sky"}

    def ask(**extra) -> list[str]:
        reply = ai.completions.create(
            model=model, prompt="the sky ", max_tokens=50, temperature=1.0, seed=3, extra_body=extra
        )
        text = reply.choices[0].text
        return words_of(text)[:-1] if text[-1:].isalpha() else words_of(text)  # the last may be cut off

    assert sum(w not in known for w in ask()) > 3  # left free, an untrained model spells nonsense
    held = ask(known_words=True)
    assert len(held) > 5 and [w for w in held if w not in known] == []
