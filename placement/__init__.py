"""placement: find where a parameter-efficient adapter should go in a causal LM, and prove it.

The flow is profile -> plan -> train -> report; each step is one module:
`models`, `sites`, `data`, `scores`, `probe`, `ranking`, `plan`, then training and reports.
"""
__version__ = "0.1.0"
