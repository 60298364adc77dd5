"""The soak of tests/test_soak.py, standalone: it prints the figures docs/RELIABILITY.md records.

    python benchmarks/soak.py [--seconds 120] [--clients 50] [--seed 20261127]

Fifty clients (REQUEST_IDENTITIES and SIGN_REQUEST, on fresh and reused
connections) against a real daemon while fake forwarded sessions appear and
disappear every 100 to 500 ms. ``--seconds`` defaults to
``SWITCHER_SOAK_SECONDS``, or 120. Exit status 1 when a request failed or
the daemon kept descriptors open. The engine lives with the test, so the
figures and the test can never drift apart.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> None:
    # The soak uses the test suite's fakes and daemon helpers.
    sys.path.insert(0, str(TESTS))
    importlib.import_module("test_soak").main()


if __name__ == "__main__":
    main()
