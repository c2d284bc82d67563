"""`placement.profile`, as scripts and the README import it, is the module `placement.study.profile` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.study.profile")
