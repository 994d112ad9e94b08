"""Several tritonservers of this model repository behind Ray Serve, with adapter affinity.

- ``triton_process``: one replica's tritonserver (started by the launcher CLI) and its HTTP calls.
- ``deployment``: ``SLoRAReplica`` (the adapter name as the multiplexed model id), ``SLoRAIngress``
  (Triton's generate / generate_stream JSON, retries on replica death), ``build_app``.
- ``cli``: ``slora-ray``.

Needs the ``ray`` extra (``pip install -e ".[ray]"``).
"""

from .deployment import RayServeOptions, build_app
from .triton_process import LaunchOptions, ReplicaUnavailable

__all__ = ["LaunchOptions", "RayServeOptions", "ReplicaUnavailable", "build_app"]
