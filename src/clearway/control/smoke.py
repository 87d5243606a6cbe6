"""Running an app's smoke checks against its canary (``@app.smoke_check``).

The checks are app code, so they run like the spec reader and the test gate
(`RevisionBuilder.run_isolated`: the revision's own environment, a throwaway
uid, a minimal environment) — never inside the control plane. They reach the
canary through the gateway's public port with a pin token for that one
revision (``x-clearway-pin-token``, valid for an hour), so they test the
revision alone, over the same path users' requests take, before it has any
weight. See ``clearway.sdk.smoke`` for the child's side.
"""

from __future__ import annotations

import sys

from clearway.control.credentials import SigningKey
from clearway.control.revisions import RevisionBuilder
from clearway.control.store import Revision

__all__ = ["SMOKE_TIMEOUT", "SmokeChecks"]

#: How long all of a revision's smoke checks together may take.
SMOKE_TIMEOUT = 300.0


class SmokeChecks:
    """A `control.rollouts.SmokeRunner`: (passed, output) for a revision."""

    def __init__(self, builder: RevisionBuilder, signing: SigningKey, *, gateway_url: str, domain: str) -> None:
        self.builder = builder
        self.signing = signing
        self.gateway_url = gateway_url
        self.domain = domain

    async def __call__(self, revision: Revision) -> tuple[bool, str]:
        python = (
            str(self.builder.environments.path_of(revision.env_digest) / "bin" / "python")
            if revision.env_digest
            else sys.executable
        )
        pin = self.signing.mint_pin_token(revision.app, revision.id)
        code, out, err = await self.builder.run_isolated(
            revision.code_dir,
            [python, "-m", "clearway.sdk.smoke", str(revision.code_dir / revision.app_file)],
            python=python,
            what="the smoke checks",
            time_limit=SMOKE_TIMEOUT,
            # The stored snapshot is readable by the app's group only: run as the app.
            uid=revision.uid,
            extra_env={
                "CLEARWAY_SMOKE_URL": self.gateway_url,
                "CLEARWAY_SMOKE_HOST": f"{revision.app}.{self.domain}",
                "CLEARWAY_SMOKE_REVISION": revision.id,
                "CLEARWAY_SMOKE_PIN_TOKEN": pin.token,
                "PYTHONPATH": str(revision.code_dir),
            },
        )
        text = (out + err).decode(errors="replace").strip()
        if code is None:
            return False, f"{text}\nthe smoke checks took longer than {SMOKE_TIMEOUT:.0f}s and were stopped".strip()
        return code == 0, text
