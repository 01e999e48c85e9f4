#!/usr/bin/env python3
"""Attacks and faults against a real hub, measured: the figures for the hardening report.

    .venv/bin/python scripts/attack_report.py            # every scenario, about 2 minutes
    .venv/bin/python scripts/attack_report.py --quick    # shorter bounds, about 1.5 minutes
    .venv/bin/python scripts/attack_report.py flood garbage --json --keep

The scenarios, one module each, and what the table's columns mean: scripts/attacks/.
"""

import sys

from attacks.report import main

if __name__ == "__main__":
    sys.exit(main())
