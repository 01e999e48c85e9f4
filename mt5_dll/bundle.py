"""Pack the EA bundle: a zip laid out as an MT5 data folder, the same bytes from the same commit.

    python3 bundle.py <out.zip> <version> <mt5hub.dll>    (run by `make bundle`, from mt5_dll/)

Entries are written in a fixed order with a fixed date (1980-01-01, zip's first), fixed
permissions and a fixed compression level, so that anyone can rebuild a published bundle and
compare it byte for byte (and the DLL's SHA-256 with the one in its README.txt).
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXED_DATE = (1980, 1, 1, 0, 0, 0)

README = """mt5hub EA bundle {version}: push MetaTrader 5 signal tables to an mt5hub hub

Install (64-bit MetaTrader 5 on Windows 8 or later):
1. In MetaTrader 5: File > Open Data Folder.
2. Unzip this file into that folder: it adds
     MQL5\\Libraries\\mt5hub.dll
     MQL5\\Include\\Mt5Hub.mqh
     MQL5\\Experts\\Mt5HubSignals.mq5
3. In the Navigator, right-click Expert Advisors > Refresh; open Mt5HubSignals in
   MetaEditor and compile it (F7).
4. Tools > Options > Expert Advisors > Allow DLL imports, and tick "Allow DLL imports" when
   attaching the EA to a chart. Set its inputs: Hub URL (wss://<hub>:8443/ws/dll), Publisher
   token, and for a development hub with a self-signed certificate its SHA-256 fingerprint
   (printed by the hub at start).

The Experts log shows the link state and every error. In the Strategy Tester the EA does not
publish unless its input "Publish from the Strategy Tester too" is set.

mt5hub.dll SHA-256: {sha256}
It needs only Windows' own KERNEL32, msvcrt and WINHTTP. The build is reproducible: from the
same source commit, `make -C mt5_dll bundle` (mingw-w64 on Linux) makes this zip byte for byte.
Documentation: mt5_dll/README.md and docs/protocol.md in the mt5hub sources.
"""


def add(bundle: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    info.create_system = 0  # "MS-DOS": the same whichever system packs it
    bundle.writestr(info, data, compresslevel=9)


def main(out: str, version: str, dll_path: str) -> None:
    dll = Path(dll_path).read_bytes()
    readme = README.format(version=version, sha256=hashlib.sha256(dll).hexdigest())
    files = [
        ("MQL5/Libraries/mt5hub.dll", dll),
        ("MQL5/Include/Mt5Hub.mqh", (HERE / "mql5/Include/Mt5Hub.mqh").read_bytes()),
        ("MQL5/Experts/Mt5HubSignals.mq5", (HERE / "mql5/Experts/Mt5HubSignals.mq5").read_bytes()),
        ("README.txt", readme.replace("\n", "\r\n").encode("utf-8")),  # Notepad's line ends
    ]
    tmp = Path(out + ".tmp")
    with zipfile.ZipFile(tmp, "w") as bundle:
        for name, data in files:
            add(bundle, name, data)
    tmp.replace(out)  # never a half-written zip under the final name
    print(f"{out}: mt5hub.dll SHA-256 {hashlib.sha256(dll).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
