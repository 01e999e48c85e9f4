"""The dashboard on protocol v1.1, in real headless Chromium against a real hub: it asks for
patches and applies them, a bookmark with `?keys=` opens one strategy's screen, and a hidden
panel is unsubscribed (the hub spends nothing on it) until it is shown again.
"""

from __future__ import annotations

import random
from typing import Any

from test_dashboard_browser import EURUSD_H1, cell, panel, publishers, row, table

from mt5hub.testing.tables import PAIRS, SignalTable

try:
    from playwright.sync_api import Page, expect
except ImportError:  # reported by the `browser` fixture (tests/browser.py)
    pass

__all__ = ["publishers"]  # the fixture, shared with tests/test_dashboard_browser.py

# What the page holds of each table, as the hub's update frames have it (patched or not).
HELD = """() => Object.fromEntries([...window.mt5hub.tables].map(([id, t]) => [id,
    {seq: t.seq, clientId: t.doc.clientId, data: t.doc.data}]))"""


def ea2(value: float) -> dict[str, Any]:
    """EA2's table: one row, one timeframe, at this value."""
    return table("EA2", "M5", "EA2_1", [row("GBPJPY", (value, "clrGreen"), M5=(value, "clrGreen"))])


def held(page: Page) -> dict[str, Any]:
    return page.evaluate(HELD)  # type: ignore[no-any-return]


def burst(publisher: Any, walks: dict[str, SignalTable], count: int) -> None:
    """`count` publishes of each table, a tenth of the cells moving each time."""
    for _ in range(count):
        for key, walk in walks.items():
            publisher.publish(table(key, "H1", f"{key}_1", walk.step()))


def settled(page: Page, seqs: dict[str, int]) -> None:
    """Until the page holds each table (by key) at this seq."""
    for key, seq in seqs.items():
        page.wait_for_function(
            f"""() => [...window.mt5hub.tables.values()]
                .some((t) => t.key === {key!r} && t.seq === {seq})"""
        )


def test_the_dashboard_ends_equal_to_a_full_reload_after_patches_and_a_reconnect(
    hub_factory: Any, publishers: Any, new_page: Any
) -> None:
    hub = hub_factory(state_interval=3600.0)  # the shutdown's save carries the tables over
    rng = random.Random(7)
    walks = {key: SignalTable(rng, PAIRS, change=0.1) for key in ("EA1", "EA2")}
    publisher = publishers(hub)
    burst(publisher, walks, 1)
    page = new_page()
    page.goto(hub.http_url)
    expect(page.locator("section.panel")).to_have_count(2)
    burst(publisher, walks, 40)
    settled(page, {"EA1": 41, "EA2": 41})
    patches, resyncs = page.evaluate("[window.mt5hub.stats.patches, window.mt5hub.stats.resyncs]")
    assert patches > 0 and resyncs == 0  # it was sent patches, and every one applied
    fresh = new_page()
    fresh.goto(hub.http_url)
    expect(fresh.locator("section.panel")).to_have_count(2)
    assert held(page) == held(fresh)

    hub.restart()  # the page reconnects to a snapshot, then gets patches again
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
    publisher = publishers(hub)
    burst(publisher, walks, 20)
    settled(page, {"EA1": 61, "EA2": 61})
    again = new_page()
    again.goto(hub.http_url)
    expect(again.locator("section.panel")).to_have_count(2)
    assert held(page) == held(again)
    assert page.evaluate("window.mt5hub.stats.resyncs") == 0
    first_cell = held(again)['["EA1","H1"]']["data"][0]["TF_data"][0]["M1"]
    expect(cell(panel(page, "EA1", "H1"), "EURUSD", "M1")).to_have_text(f"{first_cell:.1f}")


def test_a_bookmark_with_keys_opens_one_strategys_screen(
    hub: Any, publishers: Any, new_page: Any
) -> None:
    publisher = publishers(hub)
    publisher.publish(EURUSD_H1)
    publisher.publish(ea2(1))
    page = new_page()
    page.goto(f"{hub.http_url}/?keys=EA1")
    expect(panel(page, "EA1", "EURUSD_PERIOD_H1")).to_be_visible()
    expect(page.locator("section.panel")).to_have_count(1)
    publisher.publish(ea2(2))
    publisher.publish(EURUSD_H1)  # after EA2's: once the page has it, EA2's was not sent
    settled(page, {"EA1": 2})
    expect(page.locator("section.panel")).to_have_count(1)
    assert list(held(page)) == ['["EA1","EURUSD_PERIOD_H1"]']


def test_a_hidden_panel_is_unsubscribed_and_comes_back_with_its_latest_state(
    hub: Any, publishers: Any, new_page: Any
) -> None:
    publisher = publishers(hub)
    publisher.publish(EURUSD_H1)
    publisher.publish(ea2(1))
    page = new_page()
    page.goto(hub.http_url)
    ea2_panel = panel(page, "EA2", "M5")
    expect(ea2_panel).to_be_visible()
    page.locator("#panel-menu summary").click()
    page.get_by_label("EA2 · M5").uncheck()
    expect(ea2_panel).to_have_count(0)  # dropped once the hub said it sends it no more
    page.wait_for_function("() => window.mt5hub.tables.size === 1")

    publisher.publish(ea2(7))
    publisher.publish(EURUSD_H1)
    settled(page, {"EA1": 2})
    assert list(held(page)) == ['["EA1","EURUSD_PERIOD_H1"]']  # EA2's update never came

    page.reload()  # still hidden, still offered in the menu, still not sent
    expect(panel(page, "EA1", "EURUSD_PERIOD_H1")).to_be_visible()
    page.wait_for_function("() => window.mt5hub.tables.size === 1")
    page.locator("#panel-menu summary").click()
    page.get_by_label("EA2 · M5").check()
    expect(cell(ea2_panel, "GBPJPY", "M5")).to_have_text("7")  # its latest state, at once
