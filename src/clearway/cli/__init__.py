"""The ``clearway`` command line: a thin client of the control plane's REST API
(plus ``up``, which runs the control plane itself)."""
