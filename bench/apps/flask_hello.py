"""Flask hello: the app both sides of `bench/endtoend.py` serve (gunicorn behind nginx, and clearway)."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return "hello"
