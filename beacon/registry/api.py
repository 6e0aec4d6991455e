"""PLACEHOLDER: ApiServer is not built yet (replaced by its issue's work)."""

from __future__ import annotations

from typing import Any


class ApiServer:
    connected = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
