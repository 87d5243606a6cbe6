"""Functions: every trigger in one app.

* ``resize`` answers HTTP at ``/resize`` (JSON in, JSON out; wrong types get a 422);
* ``on_order`` receives ``com.example.order.created`` CloudEvents
  (`clearway events send functions --type com.example.order.created --data '{"id": 7}'`);
* ``report`` runs every minute on its own (``cw.Cron``);
* ``checkout`` (also HTTP) calls ``resize`` synchronously through the platform
  and spawns a durable ``thumbnail`` invocation that survives a control-plane
  crash (``clearway invocations functions`` lists it).

Every function scales with its load between ``min_replicas`` (0: none when
idle) and ``max_replicas``; ``clearway functions functions`` shows replicas,
in-flight requests and the autoscaler's last decisions.
"""

import clearway as cw

app = cw.App("functions")


@app.function(http="/resize", max_concurrency=8, max_replicas=4)
def resize(width: int, height: int, scale: float = 1.0) -> dict[str, int]:
    return {"width": round(width * scale), "height": round(height * scale)}


@app.function(retries=5)
def thumbnail(name: str) -> str:
    return f"thumbnail of {name}"


@app.function(events="com.example.order.created")
def on_order(event: cw.CloudEvent) -> None:
    print(f"order {event.data} created ({event['id']})")


@app.function(schedule=cw.Cron("* * * * *"))
def report() -> None:
    print("the minutely report")


@app.function(http="/checkout")
def checkout(item: str) -> dict[str, object]:
    size = resize.remote(width=640, height=480, scale=0.5)
    job = thumbnail.spawn(name=item, idempotency_key=f"thumb-{item}")
    return {"item": item, "size": size, "thumbnail_job": job.id}
