"""A real Jupyter kernel driven through jupyter_client, for interrupt and restart tests."""

from __future__ import annotations

import queue
import subprocess
import time
from collections.abc import Callable
from typing import Any

from jupyter_client.manager import KernelManager


class Kernel:
    def __init__(self, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env, stderr=subprocess.DEVNULL)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.messages: list[dict[str, Any]] = []  # every iopub message seen, for comm and display checks

    def execute(
        self, code: str, timeout: float = 180, while_running: Callable[[str], None] | None = None
    ) -> tuple[dict[str, Any], str]:
        """Run code; return (reply content, all text it showed). ``while_running(text so far)`` is called per output."""
        msg_id = self.client.execute(code)
        text = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            self.messages.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text += content["text"]
            elif kind in ("display_data", "execute_result", "update_display_data"):
                text += content["data"].get("text/plain", "") + "\n"
            elif kind == "error":
                text += "\n".join(content["traceback"]) + "\n"
            elif kind == "status" and content["execution_state"] == "idle":
                reply = self.client.get_shell_msg(timeout=10)
                return reply["content"], text
            if while_running is not None and kind in ("stream", "display_data", "execute_result"):
                while_running(text)
        raise TimeoutError(f"cell did not finish in {timeout}s; output so far:\n{text}")

    def button_comm(self, description: str) -> str:
        """The comm id of the newest button widget with this description."""
        for msg in reversed(self.messages):
            if msg["msg_type"] == "comm_open":
                state = msg["content"].get("data", {}).get("state", {})
                if state.get("_model_name") == "ButtonModel" and state.get("description") == description:
                    return msg["content"]["comm_id"]
        raise LookupError(f"no {description!r} button was displayed")

    def click(self, comm_id: str) -> None:
        """What the browser sends when a button is clicked."""
        content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
        self.client.shell_channel.send(self.client.session.msg("comm_msg", content))

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
