"""``headscope serve`` as a real subprocess with its own local Ray.

(Named test_serve_cli.py, not test_cli.py: tests/integration/test_cli.py has that basename and
the test folders are not packages.)

The subprocess starts its own Ray cluster (``ray.init`` without an address never joins a
cluster another process started with ``ray.init``), so it cannot collide with the Ray of
test_http.py; that one is also shut down when its module ends, before this module runs.
Every process the server started is found before it is stopped and checked to be gone after.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from conftest import CLI, free_port, wait_until_ready

STOP_TIMEOUT_S = 30


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    cwd: Path
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


def read_lines(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


def default_sigint() -> None:
    """A shell runs background jobs with SIGINT ignored and children inherit that; the test
    must be able to Ctrl-C the server however pytest itself was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cleanup(processes: list[psutil.Process]) -> list[str]:
    """Kill (by pid) whatever of ``processes`` is still alive; describe those."""
    alive, described = [], []
    for process in processes:
        try:
            if is_alive(process):
                described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                alive.append(process)
                process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return described


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("serve-cli")
    config = {
        "http_options": {"host": "127.0.0.1", "port": 1},  # --port overrides it
        "applications": [{
            "name": "headscope", "route_prefix": "/", "import_path": "service.app:build",
            "args": {"dataset_root": "service_data",  # relative: to the server's cwd
                     "auth_token_env": "HEADSCOPE_TEST_TOKEN_THAT_IS_NEVER_SET",
                     "models": [{"name": "minilm", "device": "cpu", "num_cpus": 0.5}]},
        }],
    }
    config_file = cwd / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("HEADSCOPE_TEST_TOKEN_THAT_IS_NEVER_SET", None)
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "serve", "--config", str(config_file), "--port", str(port)], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint)
    found = Server(process, port, cwd)
    found.reader = threading.Thread(target=read_lines, args=(process.stdout, found.lines),
                                    daemon=True)
    found.reader.start()
    try:

        def alive() -> None:
            assert process.poll() is None, f"headscope serve exited early:\n{found.stdout}"

        wait_until_ready(found.url, still_starting=alive)
        found.descendants = psutil.Process(process.pid).children(recursive=True)
        yield found
    finally:
        if process.poll() is None:  # a test failed before stopping it
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        cleanup(found.descendants)
        found.reader.join(5)


def test_prints_where_it_serves_and_a_curl_example(server: Server) -> None:
    deadline = time.monotonic() + 10
    while "stop: Ctrl-C" not in server.stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"headscope is serving minilm at {server.url}" in server.stdout
    assert f"curl -s {server.url}/v1/attention" in server.stdout
    assert "Authorization" not in server.stdout  # no token configured
    assert f"{server.url}/docs" in server.stdout


def test_answers_a_post_and_stores_under_its_cwd(server: Server) -> None:
    response = requests.post(f"{server.url}/v1/attention", timeout=60,
                             json={"texts": ["The cat sat on the mat."], "attention": "topk:2",
                                   "store": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "minilm" and body["documents"][0]["n_tokens"] == 9
    assert len(body["attention"]) == 6 * 12 * 9 * 2
    assert (server.cwd / "service_data" / "minilm" / "manifest.json").is_file()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_printed_curl_example_works(server: Server) -> None:
    line = next(line for line in server.lines if "try: curl" in line)
    command = line.split("try: ", 1)[1]
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"attention_mode":"topk:2"' in done.stdout
    assert shlex.split(command)[0] == "curl"


def test_sigint_stops_it_cleanly(server: Server) -> None:
    """Last in this module: Ctrl-C → exit code 0 within 30 s, and no Ray process left."""
    assert server.descendants, "expected Ray processes under headscope serve"
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    code = server.process.wait(STOP_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert code == 0, server.stdout[-2000:]
    assert elapsed < STOP_TIMEOUT_S
    server.reader.join(10)  # the pipe closed with the process: all output is in
    assert "stopping headscope..." in server.stdout
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(map(is_alive, server.descendants)):
        time.sleep(0.5)
    left = cleanup(server.descendants)
    assert not left, f"processes left behind: {left}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=5)
