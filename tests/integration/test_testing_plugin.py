"""The pytest plugin as our users meet it: docs/testing.md's example project run by pytest
in a subprocess, and a server fixture with no server program and no Docker daemon."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "testing_project"


def run_pytest(
    directory: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
        cwd=directory, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_docs_show_the_example_project_as_it_is() -> None:
    page = (ROOT / "docs" / "testing.md").read_text()
    shown = dict(re.findall(r"`examples/testing_project/([^`]+)`:\n\n```\w+\n(.*?)```", page, re.S))
    files = {
        str(path.relative_to(EXAMPLE)): path.read_text()
        for path in EXAMPLE.rglob("*") if path.is_file() and path.suffix in (".py", ".toml")
        and path.name != "__init__.py"
    }
    assert shown == files


def test_the_example_projects_tests_pass(tmp_path: Path) -> None:
    project = tmp_path / "testing_project"
    shutil.copytree(EXAMPLE, project)
    result = run_pytest(project, "-W", "error")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b6 passed\b", result.stdout), result.stdout


SERVER_TEST = """
def test_needs_redis(redis_lock_url):
    assert redis_lock_url.startswith("redis://")
"""


def test_without_a_server_program_or_docker_the_test_is_skipped_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "test_server.py").write_text(SERVER_TEST)
    no_servers = {
        "PATH": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/docker.sock", "CSL_REQUIRE_DOCKER": ""
    }
    result = run_pytest(tmp_path, env=no_servers)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    reason = "no redis lock server: redis-server is not on PATH, and no Docker daemon answers"
    assert f"celery-singleton-lock: {reason}" in result.stdout  # printed when it happened
    assert re.search(rf"SKIPPED \[1\] .*{reason}", result.stdout)  # and in the summary

    required = run_pytest(tmp_path, env={**no_servers, "CSL_REQUIRE_DOCKER": "1"})
    assert required.returncode == 1, required.stdout
    assert "1 error" in required.stdout
    assert "CSL_REQUIRE_DOCKER=1 asks for a container, and no Docker daemon answers" in required.stdout
