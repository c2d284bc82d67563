"""`placement.evaluate`, as scripts and the README import it, is the module `placement.train.evaluate` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.train.evaluate")
