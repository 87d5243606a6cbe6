"""A background worker: does a small chore every few seconds, forever."""

import os
import time
from pathlib import Path


def run() -> None:
    beats = Path(os.environ.get("HOME", ".")) / "heartbeats"
    count = 0
    while True:
        count += 1
        beats.write_text(str(count))
        print(f"janitor: sweep #{count}", flush=True)
        time.sleep(5)
