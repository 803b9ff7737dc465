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
    body = {"model": "long", "prompt": "a", "max_tokens": 400, "stream": True}

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
