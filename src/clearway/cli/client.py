"""A small synchronous client of the control plane's REST API, for the CLI.

It finds the running control plane through ``$CLEARWAY_HOME/control.json`` and
authenticates with ``$CLEARWAY_HOME/token``; every failure becomes one of
clearway's exceptions with a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from clearway.control.home import Home
from clearway.exceptions import APIError, AuthenticationError, NotRunningError


class Client:
    def __init__(self, home: Home, *, timeout: float = 30.0) -> None:
        self.home = home
        info = home.control_info()
        if info is None:
            raise NotRunningError(
                f"no control plane is running for {home.root}: start one with `clearway up --detach`"
            )
        token = home.token()
        if token is None:
            raise AuthenticationError(f"no API token in {home.token_path}: start the platform with `clearway up`")
        self.info = info
        self._http = httpx.Client(
            base_url=str(info["api_url"]),
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NotRunningError(
                f"the control plane at {self.info['api_url']} does not answer ({exc}): "
                "it may have stopped; start it with `clearway up --detach`"
            ) from None
        return self._decode(response)

    def text(self, path: str) -> str:
        """A plain-text endpoint (metrics)."""
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise NotRunningError(f"the control plane at {self.info['api_url']} does not answer ({exc})") from None
        if response.status_code >= 400:
            self._decode(response)
        return response.text

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.status_code == 401:
            raise AuthenticationError(response.json().get("error", "the API token was refused"))
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                raise APIError(response.status_code, response.text or response.reason_phrase) from None
            raise APIError(response.status_code, str(body.get("error")), details=body.get("details"))
        if response.status_code == 204:
            return None  # done, nothing to say
        return response.json()

    def stream_lines(self, path: str, params: dict[str, Any]) -> Iterator[str]:
        try:
            with self._http.stream("GET", path, params=params, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._decode(response)
                yield from response.iter_lines()
        except httpx.TransportError as exc:
            raise NotRunningError(f"lost the control plane at {self.info['api_url']} ({exc})") from None
