"""Python SDK for ComfyAutomate.

from sdk import ComfyUISDK
sdk = ComfyUISDK(gateway_url="http://localhost:8000")
sdk.register_server(name="My Server", address="127.0.0.1:8188")
result = sdk.execute_workflow(workflow)
print(result["images"]); print(result["log_file_path"])
"""

from gateway.api.schemas import JobResult, ServerHealth
from sdk.aio import AsyncComfyUISDK
from sdk.client import ComfyUISDK
from sdk.errors import (
    ApiError,
    ComfyAutomateError,
    FileUnusable,
    GatewayUnreachable,
    IdempotencyMismatch,
    InvalidWorkflow,
    JobFailed,
    NotFound,
    RateLimited,
    Unavailable,
    Unschedulable,
)

__all__ = [
    "ApiError",
    "AsyncComfyUISDK",
    "ComfyAutomateError",
    "ComfyUISDK",
    "FileUnusable",
    "GatewayUnreachable",
    "IdempotencyMismatch",
    "InvalidWorkflow",
    "JobFailed",
    "JobResult",
    "NotFound",
    "RateLimited",
    "ServerHealth",
    "Unavailable",
    "Unschedulable",
]
