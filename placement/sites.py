"""`placement.sites`, as scripts and the README import it, is the module `placement.model.sites` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.model.sites")
