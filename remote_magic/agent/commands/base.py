"""What every command gets: its input and output streams, and whether its client stopped listening."""

from __future__ import annotations

import json
import threading
from typing import IO, Any


class CommandIO:
    """A command's stdin and stdout (binary), and whether its client stopped listening."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.cancelled = threading.Event()

    def print_json(self, value: Any) -> None:
        self.stdout.write((json.dumps(value) + "\n").encode())
        self.stdout.flush()

    def write_text(self, text: str) -> None:
        self.stdout.write(text.encode())
