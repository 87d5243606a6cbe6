"""The control plane: desired state in SQLite, a REST API, and the reconciler.

It knows apps, revisions, traffic and scale — the *desired* state — and asks a
backend (``clearway.backends``) to make it so, reading back what the backend
observes. It never starts a process or opens an upstream socket itself.
"""
