"""Scoped viewer tokens: what a grant allows and covers, how hub.toml and the environment spell
one, and which grant the Authenticator hands a viewer (comparing with every token, always)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from mt5hub.auth import Authenticator, Refusal
from mt5hub.config import ALL, ConfigError, TokenGrant, ViewerGrant, load_config


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_allows_exact_keys_prefixes_and_any() -> None:
    grant = ViewerGrant(keys=("EA1", "GBP*"))
    assert grant.allows("EA1") and grant.allows("GBP") and grant.allows("GBPUSD_M5")
    assert not grant.allows("EA10") and not grant.allows("EA") and not grant.allows("XGBP")
    assert ALL.allows("anything") and ALL.keys == ("*",)
    assert not ViewerGrant(keys=()).allows("EA1")


@pytest.mark.parametrize(
    ("keys", "pattern", "covered"),
    [
        (("EA1",), "EA1", True),
        (("EA1",), "EA2", False),
        (("EA1",), "EA*", False),  # EA2 would match too
        (("EA1",), "*", False),
        (("EA*",), "EA1", True),
        (("EA*",), "EA*", True),
        (("EA*",), "EAX*", True),
        (("EA*",), "E*", False),  # E1 would match
        (("E*",), "EA*", True),
        (("EA*", "GBP1"), "*", False),
        (("*",), "*", True),
        (("*",), "EA*", True),
        (("*",), "EA1", True),
    ],
)
def test_covers_only_what_every_matching_key_is_allowed(
    keys: tuple[str, ...], pattern: str, covered: bool
) -> None:
    assert ViewerGrant(keys=keys).covers(pattern) is covered


def test_a_grant_never_shows_its_token() -> None:
    assert "s3cret" not in repr(ViewerGrant(token="s3cret", keys=("EA1",), name="client-a"))


def test_viewer_tokens_in_hub_toml_are_strings_or_tables(tmp_path: Path) -> None:
    toml = tmp_path / "hub.toml"
    hashed = digest("client-a-token")
    toml.write_text(
        "[mt5hub]\n"
        f'viewer_tokens = ["wall", {{token = "{hashed}", keys = ["EA1", "GBP*"], '
        'name = "client-a"}]\n'
    )
    wall, client = load_config(toml, {}).settings.viewer_tokens
    assert (wall.token, wall.keys, wall.name) == ("wall", ("*",), "")
    assert (client.token, client.keys, client.name) == (hashed, ("EA1", "GBP*"), "client-a")


def test_viewer_tokens_from_the_environment_have_the_syntax_of_publisher_tokens(
    tmp_path: Path,
) -> None:
    hashed = digest("env-viewer")
    env = {"MT5HUB_VIEWER_TOKENS": f"plain, {hashed}:EA1|GBP*"}
    plain, scoped = load_config(tmp_path / "absent.toml", env).settings.viewer_tokens
    assert (plain.token, plain.keys) == ("plain", ("*",))
    assert (scoped.token, scoped.keys, scoped.name) == (hashed, ("EA1", "GBP*"), "env#2")
    empty = load_config(tmp_path / "absent.toml", {"MT5HUB_VIEWER_TOKENS": ""})
    assert empty.settings.viewer_tokens == ()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('{token = "sha256:abc", name = "client-a"}', r"\[0\] \(client-a\): expected sha256:"),
        ('{token = "t", keys = ["E*1"], name = "client-b"}', r"\[0\] \(client-b\): keys: 'E\*1'"),
        ('{token = "t", keys = []}', r"viewer_tokens\[0\] \(unnamed\): keys: must name"),
        ('{token = "t", keyz = ["EA1"]}', r"keyz"),
        ("5", r"viewer_tokens\[0\]"),
    ],
    ids=["bad-hash", "star-inside", "no-keys", "unknown-field", "not-a-token"],
)  # fmt: skip
def test_a_bad_viewer_token_entry_is_refused_naming_the_entry_not_the_token(
    tmp_path: Path, entry: str, message: str
) -> None:
    toml = tmp_path / "hub.toml"
    toml.write_text(f"[mt5hub]\nviewer_tokens = [{entry}]\n")
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(toml, {})
    assert '"t"' not in str(refused.value)


def test_the_authenticator_hands_a_viewer_the_grant_of_its_token() -> None:
    a = ViewerGrant(token="token-a", keys=("EA1",), name="a")
    b = ViewerGrant(token=digest("token-b"), keys=("GBP*",), name="b")
    auth = Authenticator([TokenGrant("pub")], [a, b], [])
    assert auth.viewer("token-a", None, None) is a
    assert auth.viewer("token-b", None, None) is b
    assert auth.viewer(None, None, None) == Refusal(401, "missing viewer token: add ?token=<token>")
    assert auth.viewer(digest("token-b"), None, None) == Refusal(403, "invalid viewer token")
    assert auth.viewer("pub", None, None) == Refusal(403, "invalid viewer token")
    refused = auth.viewer("token-a", "https://evil.example", "hub.example")
    assert isinstance(refused, Refusal) and refused.status == 403


def test_without_viewer_tokens_every_viewer_sees_everything() -> None:
    auth = Authenticator([TokenGrant("pub")], [], [])
    assert auth.viewer(None, None, None) is ALL
    assert auth.viewer("whatever", "https://hub.example", "hub.example") is ALL


def test_the_viewer_token_is_compared_with_every_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding the first token must take as long as finding the last, or none."""
    grants = [ViewerGrant(token=f"token-{n}") for n in range(5)]
    auth = Authenticator([TokenGrant("pub")], grants, [])
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token in ("token-0", "token-4", "none-of-them"):
        calls.clear()
        auth.viewer(token, None, None)
        assert len(calls) == len(grants), token
