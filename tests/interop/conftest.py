"""Helpers for the interop tests: running the CLI, and comparing a Kiln model with a transformers one."""

from __future__ import annotations

import pytest

from kiln.cli import main


@pytest.fixture
def kiln_cli(capsys):
    """Run `kiln ARGS...`; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
