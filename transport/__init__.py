"""jobspine's websocket transport."""

__all__: list[str] = []
