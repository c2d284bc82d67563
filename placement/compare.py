"""`placement.compare`, as scripts and the README import it, is the module `placement.study.compare` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.study.compare")
