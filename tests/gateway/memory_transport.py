"""A fake transport for one thing a socket test cannot do here: a client whose
address is not on this machine. It records what the gateway writes; nothing
else about the gateway is faked."""

from __future__ import annotations

from typing import Any


class RecordingTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, data: list[bytes]) -> None:
        self.data += b"".join(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
