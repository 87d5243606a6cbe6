"""The order worker: processes a queue of orders (here, a simulated one)."""

import signal
import threading


def process_forever() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    processed = 0
    while not stop.wait(2.0):
        processed += 1
        print(f"orders: processed batch {processed}", flush=True)
    print("orders: stopping cleanly", flush=True)
