"""`placement.models`, as scripts and the README import it, is the module `placement.model.load` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.model.load")
