"""`placement.selectors`, as scripts and the README import it, is the module `placement.plan.selectors` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.plan.selectors")
