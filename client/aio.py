"""asyncio client: the same calls as ``SLoRAClient``, awaitable; generations are async iterators.

All generations share one ``grpc.aio`` channel, each on its own stream, so thousands can run
concurrently from one event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from . import protocol
from .client import _CHANNEL_OPTIONS, Completion, _GenerationState
from .errors import SLoRAClientError, from_grpc_error


class AsyncGeneration(_GenerationState, AsyncIterator[str]):
    """``async for delta in generation``; then ``finish_reason``, token counts and ``text``."""

    def __init__(self, client: AsyncSLoRAClient, request, request_id: str) -> None:
        super().__init__(request_id)
        self._client = client
        self._call = client._stub.ModelStreamInfer(_one(request), timeout=client.timeout)

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> str:
        while not self._finished:
            try:
                response = await self._call.read()
            except grpc.RpcError as e:
                self._finished = True
                if self._cancelled or e.code() == grpc.StatusCode.CANCELLED:
                    raise self._cancelled_error() from None
                raise from_grpc_error(e) from None
            if response is grpc.aio.EOF:
                self._finished = True
                raise SLoRAClientError("INTERNAL", "the stream ended before the final response")
            try:
                chunk = protocol.read_chunk(response)
            except SLoRAClientError:
                await self._drain()
                raise
            self._absorb(chunk)
            if chunk.final:
                await self._drain()
            if chunk.text:
                return chunk.text
        if self._cancelled:
            raise self._cancelled_error()
        raise StopAsyncIteration

    async def _drain(self) -> None:
        """Read the stream to its end (see ``Generation._close``)."""
        self._finished = True
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            pass

    async def cancel(self) -> None:
        """Stop the generation; the server frees its pages (see ``Generation.cancel``)."""
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        try:
            aborted = await self._client.abort(self.request_id)
        except SLoRAClientError:
            aborted = 0
        if not aborted:
            self.close()

    def close(self) -> None:
        """Cancel the gRPC stream."""
        if not self._finished:
            self._call.cancel()
            self._finished = True

    async def result(self) -> Completion:
        async for _ in self:
            pass
        return Completion(self.text, self.finish_reason, self.num_input_tokens,
                          self.num_output_tokens)


async def _one(request):
    yield request


class AsyncSLoRAClient:
    """>>> async with AsyncSLoRAClient("localhost:8001") as client:
    ...     async for delta in client.generate("Hi", lora_name="french", chat=True):
    ...         print(delta, end="")
    """

    def __init__(self, url: str = "localhost:8001", *, model: str = protocol.GENERATE_MODEL,
                 adapters_model: str = protocol.ADAPTERS_MODEL, timeout: float | None = None,
                 admin_token: str | None = None) -> None:
        self.url = url
        self.admin_token = admin_token
        self.model = model
        self.adapters_model = adapters_model
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def generate(self, prompt: str, *, lora_name: str | None = None, max_tokens: int = 128,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: list[str] | None = None, ignore_eos: bool | None = None,
                 chat: bool = False, request_id: str | None = None,
                 model: str | None = None) -> AsyncGeneration:
        request_id = request_id or protocol.new_request_id()
        request = protocol.generate_request(
            model or self.model, request_id, prompt, max_tokens=max_tokens, lora_name=lora_name,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            ignore_eos=ignore_eos, chat=chat, stream=True)
        return AsyncGeneration(self, request, request_id)

    async def complete(self, prompt: str, **kwargs: Any) -> Completion:
        return await self.generate(prompt, **kwargs).result()

    async def _adapters(self, action: str, **kwargs: Any) -> Any:
        request = protocol.adapters_request(self.adapters_model, action,
                                            admin_token=self.admin_token, **kwargs)
        try:
            response = await self._stub.ModelInfer(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from None
        return protocol.adapters_result(response)

    async def list_adapters(self) -> list[dict]:
        return (await self._adapters("list"))["adapters"]

    async def describe_adapter(self, name: str) -> dict:
        return await self._adapters("describe", lora_name=name)

    async def load_adapter(self, name: str, path: str | None = None) -> dict:
        return await self._adapters("load", lora_name=name, lora_path=path)

    async def unload_adapter(self, name: str) -> dict:
        return await self._adapters("unload", lora_name=name)

    async def stats(self) -> dict:
        return await self._adapters("stats")

    async def abort(self, request_id: str) -> int:
        return int((await self._adapters("abort", request_id=request_id))["aborted"])

    async def is_ready(self) -> bool:
        try:
            reply = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5)
            return reply.ready
        except grpc.RpcError:
            return False

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSLoRAClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
