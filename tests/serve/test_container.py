"""The container files: compose.yaml is valid and wires train -> serve safely, the Dockerfile installs the
CPU torch the Makefile pins, and the services' shell commands pick the right model. No image is built."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever is installed; None when neither is."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def resolved_compose() -> dict:
    """compose.yaml as Docker Compose itself reads it (`config` parses, validates and interpolates)."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_API_KEY", "KILN_DEMO"))}
    result = subprocess.run(
        [*command, "--file", "compose.yaml", "config"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) for each entry, in the short ("IP:HOST:CONTAINER") or long form."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append((entry.get("host_ip", ""), str(entry.get("published", "")), str(entry["target"])))
        else:
            host_ip, host_port, container = ([""] + str(entry).split("/")[0].split(":"))[-3:]
            ports.append((host_ip, host_port, container))
    return ports


def test_compose_config_accepts_the_file(resolved_compose):
    assert set(resolved_compose["services"]) == {"train", "serve"}
    assert "kiln-data" in resolved_compose["volumes"]


def test_serve_waits_for_train_to_finish_and_listens_on_loopback_only(resolved_compose):
    serve = resolved_compose["services"]["serve"]
    assert serve["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert published_ports(serve) == [("127.0.0.1", "8000", "8000")]
    assert any("/health" in part for part in serve["healthcheck"]["test"])


def test_both_services_share_one_image_and_the_data_volume(resolved_compose):
    train, serve = resolved_compose["services"]["train"], resolved_compose["services"]["serve"]
    assert train["image"] == serve["image"]
    for service in (train, serve):
        assert any(str(volume).startswith("kiln-data:/data") for volume in service["volumes"])


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments left out."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_installs_the_makefiles_cpu_torch_before_kiln():
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    installs = [line for line in dockerfile_instructions() if line.startswith("RUN") and "pip install" in line]
    torch_installs = [line for line in installs if re.search(r"\btorch\b", line)]
    assert len(torch_installs) == 1, torch_installs
    assert torch_spec in torch_installs[0].split(), f"the Dockerfile should install {torch_spec}"
    assert f"--index-url {CPU_INDEX}" in torch_installs[0]
    kiln_install = next(line for line in installs if re.search(r"pip install \.(\s|\[|$)", line))
    assert installs.index(torch_installs[0]) < installs.index(kiln_install)


def test_dockerfile_runs_kiln_as_a_user_and_exposes_the_serve_port():
    instructions = dockerfile_instructions()
    assert instructions[0].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in instructions if line.startswith("USER")]
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8000" in instructions
    assert 'ENTRYPOINT ["kiln"]' in instructions


def test_dockerignore_keeps_runs_and_environments_out_of_the_build():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "**/__pycache__"} <= set(ignored)


def service_shell(name: str, data: Path) -> str:
    """A service's `sh -c` script as the container runs it ($$ unescaped), with /data moved to `data`."""
    service = yaml.safe_load((REPO / "compose.yaml").read_text())["services"][name]
    assert service["entrypoint"] == ["sh", "-c"]
    return service["command"][0].replace("$$", "$").replace("/data", str(data))


@pytest.fixture
def fake_kiln(tmp_path) -> Path:
    """A `kiln` on PATH that records its arguments and, for `demo`, makes the OUT/RUN_NAME folder it is given."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "kiln"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = demo ] && mkdir -p "$3/$5"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return calls


def run_service(name: str, data: Path, fake_kiln: Path, **env: str) -> list[str]:
    path = f"{fake_kiln.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_API_KEY", "KILN_DEMO"))}
    subprocess.run(["sh", "-c", service_shell(name, data)], check=True, env={**clean, "PATH": path, **env})
    return fake_kiln.read_text().splitlines() if fake_kiln.exists() else []


def make_run(data: Path, finetuned: bool) -> Path:
    run = data / "demo" / "chatbot"
    (run / "best").mkdir(parents=True)
    if finetuned:
        (run / "sft" / "best").mkdir(parents=True)
    return run


TRAIN_CALL = "demo --out {data}/demo --run-name chatbot --time 200s --finetune-time 140s"


def test_train_runs_the_demo_once(tmp_path, fake_kiln):
    data = tmp_path / "data"
    assert run_service("train", data, fake_kiln) == [TRAIN_CALL.format(data=data)]
    assert run_service("train", data, fake_kiln) == [TRAIN_CALL.format(data=data)]  # done: not again


def test_train_clears_a_run_cut_short_and_trains_it_again(tmp_path, fake_kiln):
    data = tmp_path / "data"
    leftover = make_run(data, finetuned=False) / "last"
    leftover.mkdir()  # a demo killed before it finished: no marker
    assert run_service("train", data, fake_kiln) == [TRAIN_CALL.format(data=data)]
    assert not leftover.exists()


def test_serve_picks_the_demos_finetuned_chatbot(tmp_path, fake_kiln):
    data = tmp_path / "data"
    run = make_run(data, finetuned=True)
    (calls,) = run_service("serve", data, fake_kiln)
    assert calls == f"serve {run}/sft --host 0.0.0.0 --port 8000 --db {data}/chat.db"


def test_serve_falls_back_to_the_base_model_and_passes_the_api_key(tmp_path, fake_kiln):
    data = tmp_path / "data"
    run = make_run(data, finetuned=False)
    (calls,) = run_service("serve", data, fake_kiln, KILN_API_KEY="s3cret")
    assert calls == f"serve {run}/best --host 0.0.0.0 --port 8000 --db {data}/chat.db --api-key s3cret"
