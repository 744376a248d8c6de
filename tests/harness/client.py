"""A minimal HTTP + websocket client of ComfyUI's API, the protocol the frontend speaks."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Iterator

from .errors import PromptExecutionError, shorten


class ComfyClient:
    """One client id, its websocket opened on first use."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._ws = None
        self._lock = threading.Lock()

    # ---- HTTP
    def get_json(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, timeout: float = 60) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
        data = json.dumps(payload).encode()
        request = urllib.request.Request(self.base_url + path, data=data,
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return response.status, (json.loads(body) if body.strip() else None)
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body)
            except ValueError:
                return error.code, body.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        status, _ctype, body = self.get_bytes("/view?" + query)
        if status != 200:
            raise PromptExecutionError(f"/view returned {status} for {image}")
        return body

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def free(self, *, unload_models: bool = True, free_memory: bool = True) -> int:
        """What the frontend's "Unload models" ({unload_models}) and "Free model and node cache" (both) send.
        The server's worker applies it between prompts: at once when idle, else when the running one ends."""
        status, _ = self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
        return status

    def queue(self) -> tuple[list[str], list[str]]:
        """The prompt ids running and pending, as GET /queue lists them (pending in no particular order)."""
        state = self.get_json("/queue")
        return [item[1] for item in state["queue_running"]], [item[1] for item in state["queue_pending"]]

    def edit_queue(self, *, clear: bool = False, delete=()) -> int:
        """POST /queue: the queue panel's "Clear queue" (clear) or an item's cancel (delete, prompt ids)."""
        payload: dict[str, Any] = {"delete": list(delete)} if delete else {}
        if clear:
            payload["clear"] = True
        status, _ = self.post_json("/queue", payload)
        return status

    def queue_prompt(self, prompt: dict) -> str:
        self.connect()
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptExecutionError(f"/prompt refused with HTTP {status}: {body}", body)
        return body["prompt_id"]

    # ---- websocket
    def connect(self, timeout: float = 30) -> None:
        if self._ws is not None:
            return
        import websocket  # websocket-client

        url = self.base_url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ws = websocket.create_connection(url, timeout=timeout)
                return
            except (ConnectionError, OSError, websocket.WebSocketException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None

    def messages(self, timeout: float) -> Iterator[dict]:
        """Yield JSON websocket messages (binary preview frames become {'type': 'binary', 'data': {...}})."""
        import websocket

        self.connect()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no end of prompt within {timeout:.0f} s")
            self._ws.settimeout(max(remaining, 0.1))
            try:
                frame = self._ws.recv()
            except websocket.WebSocketTimeoutException as error:
                raise TimeoutError(f"no end of prompt within {timeout:.0f} s") from error
            if isinstance(frame, bytes):
                kind = int.from_bytes(frame[:4], "big") if len(frame) >= 4 else -1
                yield {"type": "binary", "data": {"event": kind, "size": len(frame)}}
            else:
                yield json.loads(frame)

    def wait_for_prompt(self, prompt_id: str, timeout: float = 300, *, on_message=None,
                        raise_on_error: bool = True) -> list[dict]:
        """Collect this prompt's messages until `executing` with node None (ComfyUI's end marker)."""
        collected: list[dict] = []
        for message in self.messages(timeout):
            data = message.get("data") or {}
            if message["type"] != "binary" and data.get("prompt_id") not in (None, prompt_id):
                continue
            collected.append(message)
            if on_message is not None:
                on_message(message)
            if message["type"] == "execution_error" and raise_on_error:
                raise PromptExecutionError(
                    f"{data.get('node_type')} (node {data.get('node_id')}) failed: "
                    f"{data.get('exception_type')}: {shorten(str(data.get('exception_message')))}\n"
                    f"{shorten(''.join(data.get('traceback') or []))}", data)
            if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return collected

    def wait_for_prompts(self, prompt_ids, timeout: float = 300) -> dict[str, list[dict]]:
        """Each of several queued prompts' messages (binary previews left out), until every one has ended; the
        dict's order is the order they ended in. Errors are not raised: the caller reads them per prompt."""
        collected: dict[str, list[dict]] = {}
        waiting = {prompt_id: [] for prompt_id in prompt_ids}
        for message in self.messages(timeout):
            prompt_id = (message.get("data") or {}).get("prompt_id")
            if prompt_id not in waiting:
                continue
            waiting[prompt_id].append(message)
            if message["type"] == "executing" and message["data"].get("node") is None:
                collected[prompt_id] = waiting.pop(prompt_id)
                if not waiting:
                    return collected

    def run_prompt(self, prompt: dict, timeout: float = 300, **kwargs) -> tuple[str, list[dict]]:
        prompt_id = self.queue_prompt(prompt)
        return prompt_id, self.wait_for_prompt(prompt_id, timeout, **kwargs)

    def output_images(self, prompt_id: str) -> list[dict]:
        images = []
        for output in self.history(prompt_id).get("outputs", {}).values():
            images.extend(output.get("images", []))
        return images
