"""Synchronous client: streaming generation and adapter management over one gRPC connection.

Each ``generate()`` opens its own bidirectional ``ModelStreamInfer`` stream on the client's one
channel (HTTP/2 carries any number of them), so many generations run at once from many threads
and each can be cancelled alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc

from . import protocol
from .errors import CancelledError, SLoRAClientError, from_grpc_error

# Large enough for long prompts and results.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 2**20),
                    ("grpc.max_receive_message_length", 64 * 2**20)]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


class _GenerationState:
    """What the sync and asyncio generations share: the answer so far and the final counts."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.text = ""
        self.finish_reason: str | None = None
        self.num_input_tokens = 0
        self.num_output_tokens = 0
        self._cancelled = False
        self._finished = False

    def _absorb(self, chunk: protocol.Chunk) -> None:
        """Fold one streamed response into the answer."""
        self.num_input_tokens = chunk.num_input_tokens or self.num_input_tokens
        self.num_output_tokens = chunk.num_output_tokens or self.num_output_tokens
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        self.text += chunk.text

    def _cancelled_error(self) -> CancelledError:
        return CancelledError("CANCELLED", f"request {self.request_id} was cancelled")


class Generation(_GenerationState, Iterator[str]):
    """A running generation: iterate it for text deltas.

    After the last delta, ``finish_reason``, ``num_input_tokens`` and ``num_output_tokens`` hold
    the final values and ``text`` the whole answer. A server error is raised from ``__next__``
    as ``SLoRAClientError`` (with the code). ``cancel()`` stops it on the server and frees its
    resources there.
    """

    def __init__(self, client: SLoRAClient, request, request_id: str) -> None:
        super().__init__(request_id)
        self._client = client
        # One request, then our half of the stream closes; Triton goes on sending responses
        # until the final one.
        self._call = client._stub.ModelStreamInfer(iter([request]), timeout=client.timeout)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        while not self._finished:
            try:
                response = next(self._call)
            except StopIteration:
                self._close()
                if self._cancelled:
                    raise self._cancelled_error() from None
                raise SLoRAClientError("INTERNAL", "the stream ended before the final response") from None
            except grpc.RpcError as e:
                self._close()
                if self._cancelled:
                    raise self._cancelled_error() from None
                raise from_grpc_error(e) from None
            try:
                chunk = protocol.read_chunk(response)
            except SLoRAClientError:
                self._close()
                raise
            self._absorb(chunk)
            if chunk.final:
                self._close()
            if chunk.text:
                return chunk.text
        if self._cancelled:
            raise self._cancelled_error()
        raise StopIteration

    def _close(self) -> None:
        """The answer is complete: read the stream to its end. Leaving it to be cancelled instead
        makes Triton 2.51 keep the ensemble alive until its exit timeout at shutdown."""
        if self._finished:
            return
        self._finished = True
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass

    def cancel(self) -> None:
        """Stop the generation; the server frees its pages.

        The request is aborted by id through ``slora_adapters`` (this reaches the engine whether
        the request went through the ensemble or not: Triton 2.51 does not pass a stream
        cancellation on to an ensemble step already running). The server then ends the stream
        with a CANCELLED error, which the next ``__next__`` raises as ``CancelledError``. Only
        when the server no longer knows the request is the gRPC stream itself cancelled.
        """
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        try:
            aborted = self._client.abort(self.request_id)
        except SLoRAClientError:
            aborted = 0
        if not aborted:
            self.close()

    def close(self) -> None:
        """Cancel the gRPC stream (a stream cancellation; the engine model sees it directly)."""
        if not self._finished:
            self._finished = True
            self._call.cancel()

    def result(self) -> Completion:
        for _ in self:
            pass
        return Completion(self.text, self.finish_reason, self.num_input_tokens,
                          self.num_output_tokens)


class SLoRAClient:
    """Client of a slora-triton server.

    >>> with SLoRAClient("localhost:8001") as client:
    ...     for delta in client.generate("What is the capital of France?", lora_name="pirate",
    ...                                  chat=True):
    ...         print(delta, end="", flush=True)
    """

    def __init__(self, url: str = "localhost:8001", *, model: str = protocol.GENERATE_MODEL,
                 adapters_model: str = protocol.ADAPTERS_MODEL, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 admin_token: str | None = None) -> None:
        self.url = url
        self.admin_token = admin_token  # sent with every adapter action (servers with a token)
        self.model = model
        self.adapters_model = adapters_model
        self.timeout = timeout
        if credentials is None:
            self._channel = grpc.insecure_channel(url, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(url, credentials, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    # ---- generation --------------------------------------------------------------------------

    def generate(self, prompt: str, *, lora_name: str | None = None, max_tokens: int = 128,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: list[str] | None = None, ignore_eos: bool | None = None,
                 chat: bool = False, request_id: str | None = None,
                 model: str | None = None) -> Generation:
        """Start a streaming generation; iterate the result for text deltas.

        ``lora_name`` None or "" is the base model. ``chat=True`` wraps the prompt in the
        model's chat template as one user turn (server side). ``temperature`` etc. left None
        take the server's defaults (greedy).
        """
        request_id = request_id or protocol.new_request_id()
        request = protocol.generate_request(
            model or self.model, request_id, prompt, max_tokens=max_tokens, lora_name=lora_name,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            ignore_eos=ignore_eos, chat=chat, stream=True)
        return Generation(self, request, request_id)

    def complete(self, prompt: str, **kwargs: Any) -> Completion:
        """``generate`` run to its end."""
        return self.generate(prompt, **kwargs).result()

    # ---- adapters and introspection --------------------------------------------------------------

    def _adapters(self, action: str, **kwargs: Any) -> Any:
        request = protocol.adapters_request(self.adapters_model, action,
                                            admin_token=self.admin_token, **kwargs)
        try:
            response = self._stub.ModelInfer(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from None
        return protocol.adapters_result(response)

    def list_adapters(self) -> list[dict]:
        return self._adapters("list")["adapters"]

    def describe_adapter(self, name: str) -> dict:
        return self._adapters("describe", lora_name=name)

    def load_adapter(self, name: str, path: str | None = None) -> dict:
        """Register ``<adapter_root>/<path or name>`` under ``name`` (validated, persisted)."""
        return self._adapters("load", lora_name=name, lora_path=path)

    def unload_adapter(self, name: str) -> dict:
        """Refused (UNAVAILABLE) while requests use the adapter."""
        return self._adapters("unload", lora_name=name)

    def stats(self) -> dict:
        return self._adapters("stats")

    def abort(self, request_id: str) -> int:
        """Abort in-flight generations sent with ``request_id``; returns how many."""
        return int(self._adapters("abort", request_id=request_id)["aborted"])

    def is_ready(self) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            return self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5).ready
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SLoRAClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
