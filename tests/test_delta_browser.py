"""templates/static/patch.js in real headless Chromium does what mt5hub.delta.apply does.

The hub serves the module as it serves the dashboard's; the page applies bodies that
mt5hub.delta.diff made (sent as JSON text, as they would arrive) one after the other, as a
viewer does, and what it ends up holding must be what a full update would have given it.
"""

from __future__ import annotations

import json
import random
from typing import Any

from delta_cases import as_javascript_reads_it, document, mutate, table_of

from mt5hub.delta import diff

CHAINS, STEPS = 150, 6

APPLY_ALL = """async (text) => {
    const { applyPatch } = await import('./static/patch.js');
    return JSON.stringify(JSON.parse(text).map(([first, bodies]) => {
        const held = [];
        let doc = first;
        for (const body of bodies) {
            const before = JSON.stringify(doc);
            const next = applyPatch(doc, body);
            if (JSON.stringify(doc) !== before) throw new Error('applyPatch changed its doc');
            held.push(next);
            doc = next;
        }
        return held;
    }));
}"""


def chains(seed: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Updates one after the other, seeded: the first document and each following one."""
    rng = random.Random(seed)
    result = []
    for _ in range(CHAINS):
        docs = [document(rng)]
        for _ in range(STEPS):
            docs.append(mutate(rng, docs[-1]))
        result.append((docs[0], docs[1:]))
    return result


EVERY_KIND = {
    *("set", "unset", "set data", "rows", "added", "removed", "order"),
    *("row set", "row unset", "row set TF_data", "row cells", "row removed", "row order"),
}


def kinds(body: dict[str, Any]) -> set[str]:
    """What a body does, e.g. {"rows", "row cells", "order"}."""
    found = set(body) | {"set data"} & {f"set {name}" for name in body.get("set", {})}
    for rowpatch in body.get("rows", {}).values():
        found |= {f"row {key}" for key in rowpatch}
        found |= {"row set TF_data"} & {f"row set {name}" for name in rowpatch.get("set", {})}
    return found


def test_the_dashboard_applies_patches_as_the_hub_makes_them(hub: Any, new_page: Any) -> None:
    cases = chains(seed=22)
    sent = [
        (first, [diff(old, new) for old, new in zip([first, *rest], rest, strict=False)])
        for first, rest in cases
    ]
    seen = {kind for _, bodies in sent for body in bodies for kind in kinds(body)}
    assert seen == EVERY_KIND  # the awkward cases are all among them
    page = new_page()
    page.goto(hub.http_url)
    held = json.loads(page.evaluate(APPLY_ALL, json.dumps(sent)))
    wrong = [
        (n, step)
        for n, ((_, rest), got) in enumerate(zip(cases, held, strict=True))
        for step, (new, doc) in enumerate(zip(rest, got, strict=True))
        if as_javascript_reads_it(table_of(doc)) != as_javascript_reads_it(table_of(new))
    ]
    assert wrong == []
