"""bk-sim: a federated-simulation and load-testing harness for BranchKey.

Library code logs through the ``bk_sim`` logger and never prints; the CLI decides what a
person sees.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
