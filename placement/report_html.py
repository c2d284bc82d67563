"""`placement.report_html`, as scripts and the README import it, is the module `placement.report.html` itself."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("placement.report.html")
