"""`placement.scores`, as scripts and the README import it, is the module `placement.probe.scores` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.probe.scores")
