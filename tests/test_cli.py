"""The `mt5hub` command, run as an operator runs it: the console script pip installed.

`check-config` must refuse exactly what the hub refuses, with the reason, and never start a hub;
`load` is the load tester (scripts/fake_dll.py) against a real hub; `ea-bundle` hands over to
the DLL's Makefile.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import MT5HUB, ROOT, RunningHub

from mt5hub.cli import hashed
from mt5hub.config import DEFAULT_TOKEN, load_config
from mt5hub.testing.launcher import free_port, hub_toml


def run(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env_free = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no MT5HUB_* from the caller
    return subprocess.run(
        [str(MT5HUB), *args],
        cwd=cwd,
        env=env_free,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write(folder: Path, name: str, top: dict[str, object], hub: dict[str, object]) -> Path:
    tokens = hub.pop("tokens", [{"token": "a-token-of-our-own", "keys": ["*"]}])
    assert isinstance(tokens, list)
    path = folder / name
    path.write_text(hub_toml({"worker_class": "trio", **top}, hub, tokens))
    return path


def test_check_config_passes_a_config_the_hub_serves_and_says_what_it_will_do(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "ok.toml", {"bind": ["0.0.0.0:8000"]}, {"max_viewers": 50})
    done = run("check-config", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the hub would start" in done.stdout and "0.0.0.0:8000" in done.stdout
    assert "a-token-of-our-own" not in done.stdout + done.stderr  # never said back


@pytest.mark.parametrize(
    ("top", "hub", "reason"),
    [
        (
            {"bind": ["0.0.0.0:8000"]},
            {"tokens": [{"token": DEFAULT_TOKEN, "keys": ["*"]}]},
            "default publisher token",
        ),
        ({"bind": ["127.0.0.1:8000"], "workers": 2}, {}, "workers = 2"),
        ({"bind": ["127.0.0.1:8000"]}, {"max_viewerz": 5}, "max_viewerz"),
        ({"bind": ["127.0.0.1:8000"]}, {"state_interval": 0.0}, "state_interval"),
        ({"bind": ["127.0.0.1:8443"], "certfile": "nope.crt", "keyfile": "nope.key"}, {}, "nope"),
        (
            {"bind": ["127.0.0.1:8000"]},
            {"tokens": [{"token": "sha256:abc", "keys": ["*"]}]},
            "tokens[0]",
        ),
        ({"bind": ["127.0.0.1:8000"]}, {"status_access": "token"}, "needs a status_token"),
        ({"bind": ["127.0.0.1:8000"]}, {"status_access": "public"}, "status_access: expected"),
    ],
    ids=["default-token-public", "workers-no-backplane", "unknown-key", "bad-value", "no-cert",
         "bad-hash", "status-token-missing", "status-access-unknown"],
)  # fmt: skip
def test_check_config_refuses_what_the_hub_refuses_with_the_reason_and_exit_1(
    tmp_path: Path, top: dict[str, object], hub: dict[str, object], reason: str
) -> None:
    path = write(tmp_path, "bad.toml", top, hub)
    done = run("check-config", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    assert "refused" in done.stderr and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_names_the_file_of_a_toml_syntax_error_and_a_missing_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "broken.toml").write_text("[mt5hub\nrate_limit = 1\n")
    done = run("check-config", "broken.toml", cwd=tmp_path)
    assert done.returncode == 1 and "broken.toml" in done.stderr, done.stderr
    done = run("check-config", "absent.toml", cwd=tmp_path)
    assert done.returncode == 1 and "absent.toml: no such file" in done.stderr, done.stderr


def test_check_config_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    path = write(tmp_path, "ok.toml", {"bind": [f"127.0.0.1:{port}"]}, {})
    assert run("check-config", str(path), cwd=tmp_path).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody listens there


def test_token_new_for_a_viewer_prints_the_token_its_hash_line_and_the_dashboard_link() -> None:
    done = run("token", "new", "--viewer")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    token = lines[0]
    link = f"https://localhost:8443/?token={token}"
    assert [line for line in lines if token in line] == [token, link]  # nowhere else
    assert f'viewer_tokens = ["{hashed(token)}"]' in lines
    assert f"# or in the environment: MT5HUB_VIEWER_TOKENS={hashed(token)}" in lines


def test_token_new_for_a_scoped_viewer_prints_its_keys_and_a_link_that_asks_for_them(
    tmp_path: Path,
) -> None:
    done = run(
        "token", "new", "--viewer", "--keys", "EA1, EA*,a&b", "--name", "client-a",
        "--url", "https://hub.example.com:8443/dash?theme=dark",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    token = lines[0]
    (link,) = (line for line in lines[1:] if token in line)
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "hub.example.com:8443", "/dash")
    assert parse_qs(parts.query) == {"theme": ["dark"], "token": [token], "keys": ["EA1,EA*,a&b"]}
    assert "keys=EA1,EA*,a%26b" in link
    env = f"# or in the environment: MT5HUB_VIEWER_TOKENS={hashed(token)}:EA1|EA*|a&b"
    assert env in lines
    # The hub.toml line, as the hub loads it.
    (entry,) = (line for line in lines if line.startswith("viewer_tokens = "))
    (tmp_path / "hub.toml").write_text(f"[mt5hub]\n{entry}\n")
    (grant,) = load_config(tmp_path / "hub.toml", {}).settings.viewer_tokens
    assert (grant.token, grant.keys, grant.name) == (
        hashed(token),
        ("EA1", "EA*", "a&b"),
        "client-a",
    )


def test_token_new_refuses_a_viewer_key_pattern_the_hub_would_refuse() -> None:
    done = run("token", "new", "--viewer", "--keys", "E*1")
    assert done.returncode == 2 and "'E*1'" in done.stderr and not done.stdout


def test_token_new_for_a_publisher_prints_no_link() -> None:
    done = run("token", "new", "--keys", "EA1", "--url", "https://hub.example.com/")
    assert done.returncode == 0, done.stderr
    assert "://" not in done.stdout and "MT5HUB_TOKENS=sha256:" in done.stdout


def test_a_token_hash_without_a_token_on_stdin_is_an_error() -> None:
    done = run("token", "hash")
    assert done.returncode == 2 and "got none" in done.stderr


def test_unknown_commands_and_arguments_are_refused_with_usage() -> None:
    assert run("serve").returncode == 2
    done = run("check-config", "a.toml", "--bogus")
    assert done.returncode == 2 and "--bogus" in done.stderr


@pytest.mark.slow
def test_load_runs_the_load_tester_against_a_real_hub(hub: RunningHub) -> None:
    done = run(
        "load", "--url", hub.ws_url, "--token", hub.token, "-p", "1", "-r", "5", "-v", "2",
        "--seconds", "1", "--warmup", "0", "--json", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["viewers_closed"] == 0 and result["updates_delivered"] > 0, result


def test_load_help_is_the_load_testers() -> None:
    done = run("load", "--help")
    assert done.returncode == 0 and "--viewers" in done.stdout and "--stalled" in done.stdout


def test_ea_bundle_is_wired_to_the_dll_makefile() -> None:
    done = run("ea-bundle", "--help")
    assert done.returncode == 0 and "make -C mt5_dll bundle" in done.stdout.replace("\n", " ")


def test_ea_bundle_builds_the_zip_a_trader_unpacks_into_the_data_folder() -> None:
    import zipfile

    from conftest import require_tool

    require_tool("x86_64-w64-mingw32-gcc", "builds mt5hub.dll")
    done = run("ea-bundle", timeout=300)
    assert done.returncode == 0, done.stderr
    (bundle,) = (Path(line) for line in done.stdout.splitlines() if line.endswith(".zip"))
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {
        "MQL5/Libraries/mt5hub.dll",
        "MQL5/Include/Mt5Hub.mqh",
        "MQL5/Experts/Mt5HubSignals.mq5",
    } <= names
