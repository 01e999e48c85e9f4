"""Chromium for tests, as a user has it: Debian's /usr/bin/chromium driven by Playwright, with
the tests' CA in its trust store (registered in conftest.py as a pytest plugin).

Fixtures: `browser` (one per session) and `new_page(**context_options)`. Outside CI a missing
browser skips the tests that use it; under CI=true it fails them, so that a broken install cannot
pass for green.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import require_tool

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # reported by the `browser` fixture, as a skip or (under CI) a failure
    sync_playwright = None

CHROMIUM = os.environ.get("MT5HUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",  # this machine has no internet: no pointless connects
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000


@pytest.fixture(scope="session")
def browser_home(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Path:
    """A HOME whose NSS database (where Chromium on Linux looks) trusts the tests' CA, which
    issues every test hub's certificate: pages over https:// and sockets over wss:// are
    verified as a user's browser verifies them, with no certificate errors ignored."""
    certutil = require_tool("/usr/bin/certutil", "makes Chromium trust the test CA")
    home = tmp_path_factory.mktemp("chromium-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    ca.cert_pem.write_to_path(str(home / "ca.pem"))
    for command in (
        ["-N", "--empty-password"],
        ["-A", "-n", "mt5hub test CA", "-t", "C,,", "-i", str(home / "ca.pem")],
    ):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", *command], check=True, capture_output=True)
    return home


@pytest.fixture(scope="session")
def browser(browser_home: Path) -> Iterator[Browser]:
    problem = None
    if sync_playwright is None:
        problem = "the playwright package is missing: pip install playwright"
    elif not Path(CHROMIUM).exists():
        problem = f"no Chromium at {CHROMIUM}: apt-get install chromium"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            env={**os.environ, "HOME": str(browser_home)},
        )
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """`new_page(**context_options)`: a fresh page (own localStorage). After the test, the page
    must have thrown no error and broken no Content-Security-Policy rule."""
    contexts = []
    problems: list[str] = []

    def make(**options: Any) -> Page:
        options.setdefault("viewport", {"width": 1280, "height": 800})
        context = browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console: {msg.text}")
                if "Content Security Policy" in msg.text
                else None
            ),
        )
        return page

    yield make
    for context in contexts:
        context.close()
    assert problems == []
