"""The MQL5 side of mt5hub.dll (mt5_dll/mql5), checked against the C header.

MetaEditor is Windows-only and MQL5 cannot run here, so these tests read the sources: the
constants and `#import`s of Mt5Hub.mqh must match include/mt5hub.h (a mismatch is a silent bug in
every EA), and the example EA must stay quiet in the Strategy Tester unless told otherwise.
"""

from __future__ import annotations

import re

from conftest import ROOT

MT5_DLL = ROOT / "mt5_dll"
HEADER = (MT5_DLL / "include" / "mt5hub.h").read_text()
MQH = (MT5_DLL / "mql5" / "Include" / "Mt5Hub.mqh").read_text()
EA = (MT5_DLL / "mql5" / "Experts" / "Mt5HubSignals.mq5").read_text()


def c_constants() -> dict[str, int]:
    """`#define MT5HUB_X <int>` and `(-N)` of the C header, with MT5HUB_STAT_LAST resolved."""
    found: dict[str, int] = {}
    for name, value in re.findall(r"^#define (MT5HUB_\w+) +\(?(-?\d+)\)?", HEADER, re.M):
        found[name] = int(value)
    return found


def mql_constants() -> dict[str, int]:
    return {
        name: int(value) for name, value in re.findall(r"^#define (MT5HUB_\w+) +(-?\d+)", MQH, re.M)
    }


def test_mqh_constants_match_the_header() -> None:
    ours, theirs = c_constants(), mql_constants()
    needed = [
        n
        for n in ours
        if n.startswith(("MT5HUB_E_", "MT5HUB_STATE_", "MT5HUB_STAT_", "MT5HUB_FLAG"))
    ]
    needed += ["MT5HUB_VERSION", "MT5HUB_QUEUED", "MT5HUB_COALESCED", "MT5HUB_LEASE_DEFAULT"]
    assert len(needed) >= 30
    missing = [n for n in needed if n not in theirs]
    assert not missing, f"Mt5Hub.mqh lacks {missing}"
    wrong = {n: (ours[n], theirs[n]) for n in theirs if n in ours and ours[n] != theirs[n]}
    assert not wrong, f"Mt5Hub.mqh disagrees with mt5hub.h: {wrong}"


def test_mqh_imports_every_export_with_its_parameter_count() -> None:
    exports = dict(re.findall(r"MT5HUB_API [\w ]+?\b(Mt5Hub\w+)\(([^)]*)\)", HEADER))
    block = MQH.split('#import "mt5hub.dll"', 1)[1].split("#import", 1)[0]
    imports = dict(re.findall(r"\b(Mt5Hub\w+)\(([^)]*)\)", block))
    assert set(imports) == set(exports), (sorted(imports), sorted(exports))

    def arity(params: str) -> int:
        return 0 if params.strip() in ("", "void") else params.count(",") + 1

    for name, params in exports.items():
        assert arity(imports[name]) == arity(params), name
    # Every result code has words for the Experts log.
    for name in (n for n in mql_constants() if n.startswith("MT5HUB_E_")):
        assert f"case {name}:" in MQH, f"Mt5HubResultText has no words for {name}"


def test_the_example_ea_does_not_publish_from_the_strategy_tester_unless_told() -> None:
    assert re.search(r"^input bool +InpPublishInTester += false;", EA, re.M)
    on_init = EA.split("int OnInit()", 1)[1].split("\n  }\n", 1)[0]
    guard = on_init.index("MQLInfoInteger(MQL_TESTER)")
    assert "MQLInfoInteger(MQL_OPTIMIZATION)" in on_init[guard : guard + 200]
    assert "!InpPublishInTester" in on_init[guard : guard + 200]
    # The guard returns before the EA touches the DLL or its timer.
    returned = on_init.index("return(INIT_SUCCEEDED);", guard)
    for first_use in ("g_hub.Open", "Mt5HubVersion", "EventSetTimer"):
        assert returned < on_init.index(first_use), first_use
    # And the handle gets a lease longer than the timer period; OnTimer renews it via Report.
    assert "3 * InpTimerSeconds" in on_init and "g_hub.Report()" in EA
