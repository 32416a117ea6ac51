"""The host-side agent.

Everything in this package is copied verbatim to the training host, so it
imports only the standard library at import time and nothing from outside
this folder (relative imports only).  Heavy packages (cloudpickle, keras)
are imported lazily, inside the functions that need them.
"""
