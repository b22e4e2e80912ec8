"""Stop strings over streamed text: holds back a possible partial match, truncates at a full one."""

from __future__ import annotations


class StopStringFilter:
    """Feed text pieces; get back the text safe to emit. After a hit, ``stopped`` is the string."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped: str | None = None

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str) -> str:
        if self.stopped is not None or not text:
            return ""
        if not self._stops:
            return text
        buffer = self._pending + text
        # The stop that completes first wins (generation would end there), whatever a longer
        # stop starting earlier might have become; ties go to the one starting earliest.
        hits = [(i + len(s), i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            _, index, stop = min(hits)
            self.stopped = stop
            self._pending = ""
            return buffer[:index]
        keep = self._partial_suffix_len(buffer)
        self._pending = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of output: what was held back is not a stop after all."""
        out, self._pending = ("" if self.stopped is not None else self._pending), ""
        return out

    def _partial_suffix_len(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop."""
        for length in range(min(self._holdback, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0
