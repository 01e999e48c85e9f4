"""Secrets: tokens may live in hub.toml as hashes only, and no token is ever said back.

`mt5hub token new` makes a token and prints the line for hub.toml with its SHA-256; a real hub
configured with nothing but that hash accepts the token and nothing else. Error frames, refusals
and log lines never carry a token, whether it was right, wrong, or sent in the wrong place.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import MT5HUB, RunningHub
from helpers import publish_frame, publisher, receive, viewer
from trio_websocket import ConnectionRejected, open_websocket_url

from mt5hub.config import (
    DEFAULT_TOKEN,
    ConfigError,
    HubConfig,
    check_safe_to_serve,
    load_config,
)

HubFactory = Callable[..., RunningHub]


def mt5hub(*args: str, stdin: str = "") -> list[str]:
    """The lines the `mt5hub` command printed (it must succeed)."""
    done = subprocess.run(
        [str(MT5HUB), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def toml_part(lines: list[str]) -> dict[str, object]:
    """The hub.toml lines the command printed, parsed as TOML (not the comments, nor the link)."""
    toml = (line for line in lines[1:] if not line.startswith("#") and "://" not in line)
    return tomllib.loads("\n".join(toml))


def test_new_token_prints_the_token_once_and_hub_toml_gets_only_its_hash() -> None:
    lines = mt5hub("token", "new", "--name", "desk-1", "--keys", "EA1,EA2")
    token = lines[0]
    assert len(token) >= 43  # 256 random bits, URL-safe
    grant = toml_part([line for line in lines if not line.startswith("# or")])["mt5hub"]
    assert isinstance(grant, dict)
    (entry,) = grant["tokens"]
    assert entry == {
        "token": "sha256:" + hashlib.sha256(token.encode()).hexdigest(),
        "keys": ["EA1", "EA2"],
        "name": "desk-1",
    }
    assert sum(token in line for line in lines) == 1
    assert mt5hub("token", "hash", stdin=token + "\n") == [entry["token"]]
    assert mt5hub("token", "new")[0] != token


async def test_a_hub_configured_with_hashes_only_accepts_the_tokens_and_nothing_else(
    hub_factory: HubFactory,
) -> None:
    publisher_lines = mt5hub("token", "new", "--keys", "EA1")
    viewer_lines = mt5hub("token", "new", "--viewer")
    hashed_grant = toml_part(publisher_lines)["mt5hub"]
    assert isinstance(hashed_grant, dict)
    hashed_viewers = toml_part(viewer_lines)["viewer_tokens"]
    hub = hub_factory(tokens=hashed_grant["tokens"], viewer_tokens=hashed_viewers)
    toml = (hub.folder / "hub.toml").read_text()
    assert publisher_lines[0] not in toml and viewer_lines[0] not in toml
    dashboard = f"{hub.ws_url}/ws?token={viewer_lines[0]}"
    async with (
        open_websocket_url(dashboard) as view,
        publisher(hub.ws_url, publisher_lines[0]) as pub,
    ):
        await receive(view, "snapshot")
        await pub.send_message(publish_frame(key="EA1"))
        assert (await receive(view, "update"))["key"] == "EA1"
        # The hash itself is not a token: whoever reads hub.toml cannot publish with it.
        for stolen in (hashed_grant["tokens"][0]["token"], hashed_grant["tokens"][0]["token"][7:]):
            with pytest.raises(ConnectionRejected) as refused:
                async with publisher(hub.ws_url, stolen):
                    pass
            assert refused.value.status_code == 403
    with pytest.raises(ConnectionRejected) as refused:
        async with viewer(hub.ws_url, path=f"/ws?token={hashed_viewers[0]}"):  # type: ignore[index]
            pass
    assert refused.value.status_code == 403
    log = hub.log()
    assert publisher_lines[0] not in log and viewer_lines[0] not in log


async def test_no_token_is_echoed_in_refusals_error_frames_or_the_log(
    hub_factory: HubFactory,
) -> None:
    limited = "limited-token-5c1d"
    wrong = "wrong-token-77ab"
    hub = hub_factory(tokens=[{"token": limited, "keys": ["EA1"], "name": "limited"}])
    bodies: list[bytes] = []
    for url, headers in (
        (f"{hub.ws_url}/ws/dll?token={wrong}", []),
        (f"{hub.ws_url}/ws/dll", [("Authorization", f"Bearer {wrong}")]),
        (f"{hub.ws_url}/ws/dll", [("X-Token", limited)]),  # the right token, in the wrong place
        (f"{hub.ws_url}/ws/dll", [("Cookie", f"token={limited}")]),
    ):
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(url, extra_headers=headers):
                pass
        assert refused.value.status_code in (401, 403)
        bodies.append(refused.value.body or b"")
    async with publisher(hub.ws_url, limited) as pub:
        await pub.send_message(publish_frame(key="EA2"))  # not allowed for this token
        await pub.send_message(json.dumps({"type": "ping", "token": limited}))
        error = await receive(pub, "error")
        assert error["code"] == "forbidden_key"
        frames = [json.dumps(error), json.dumps(await receive(pub, "pong"))]
    with trio.fail_after(30):
        while "forbidden_key" not in hub.log():
            await trio.sleep(0.05)
    for said in [*bodies, *(f.encode() for f in frames), hub.log().encode()]:
        assert wrong.encode() not in said and limited.encode() not in said


def test_tokens_from_the_environment_may_be_hashes_limited_to_keys(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"env-token").hexdigest()
    config = load_config(
        tmp_path / "absent.toml",
        {"MT5HUB_TOKENS": f"plain-one,sha256:{digest}:EA1|EA2", "MT5HUB_VIEWER_TOKENS": ""},
    )
    assert [(g.token, g.keys) for g in config.settings.tokens] == [
        ("plain-one", ("*",)),
        (f"sha256:{digest}", ("EA1", "EA2")),
    ]


def test_a_malformed_hash_is_refused_when_the_config_loads_naming_the_entry(
    tmp_path: Path,
) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text('[[mt5hub.tokens]]\ntoken = "sha256:abc"\nname = "desk-9"\n')
    with pytest.raises(ConfigError, match=r"tokens\[0\] \(desk-9\): expected sha256:") as error:
        load_config(toml, {})
    assert "abc" not in str(error.value).split("desk-9")[0]


def test_the_default_token_is_refused_on_a_public_bind_even_hashed(tmp_path: Path) -> None:
    hashed = "sha256:" + hashlib.sha256(DEFAULT_TOKEN.encode()).hexdigest()

    def config(token: str, bind: str) -> HubConfig:
        settings = load_config(tmp_path / "absent.toml", {"MT5HUB_TOKENS": token}).settings
        return HubConfig(settings=settings, binds=(bind,))

    for token in (DEFAULT_TOKEN, hashed):
        with pytest.raises(ConfigError, match="default publisher token"):
            check_safe_to_serve(config(token, "0.0.0.0:8443"))
        check_safe_to_serve(config(token, "127.0.0.1:8443"))  # loopback: the seed's way
