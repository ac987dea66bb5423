"""``python -m bk_sim.cli``: the ``bk-sim`` command (how the local platform is started)."""

from bk_sim.cli import main

main(prog_name="bk-sim")
