"""The backplane's Lua scripts, read from lua/*.lua when a backplane is made.

Each script's first line says which library pieces (lua/lib_*.lua) go before it:
`-- needs: now, held, records`. Every script runs atomically in Redis; see each file's header for
its KEYS and ARGV.
"""

from __future__ import annotations

from importlib.resources import files

import attrs

_LUA = files(__package__).joinpath("lua")


def library(name: str) -> str:
    """A library piece (lua/lib_<name>.lua): local functions the scripts share."""
    return _LUA.joinpath(f"lib_{name}.lua").read_text(encoding="utf-8")


def source(name: str) -> str:
    """The full text of script `name`: its library pieces, then its own."""
    text = _LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    first, _, _ = text.partition("\n")
    if not first.startswith("-- needs:"):
        raise ValueError(f"lua/{name}.lua: the first line must say what it needs")
    needs = [n.strip() for n in first.removeprefix("-- needs:").split(",") if n.strip()]
    return "".join(library(n) for n in needs) + text


@attrs.frozen
class Scripts:
    write_batch: str
    offer_state: str
    register: str
    heartbeat: str
    reap: str
    load: str
    claimed: str


def load() -> Scripts:
    return Scripts(**{field.name: source(field.name) for field in attrs.fields(Scripts)})
