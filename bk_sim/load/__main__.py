"""``python -m bk_sim.load ...``: the ``bk-sim`` CLI with gevent patched first.

``bk-sim load`` re-executes itself here (see ``_cli``); the arguments are the CLI's own.
"""

import locust  # noqa: F401, I001 - first: gevent monkey-patches on this import

from bk_sim.cli import main

main(prog_name="bk-sim")
