"""The simulation: N leaves as processes playing rounds against a platform.

Leaves' tensors are deterministic (``_synth``): any upload can be regenerated from the
scenario seed, the leaf index, the round and the aggregate the leaf started from.
"""
