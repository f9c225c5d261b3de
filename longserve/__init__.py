"""longserve: serve and validate LLMs at 128K-token context on NVIDIA Hopper."""

from longserve.config import EngineConfig, ModelConfig
from longserve.engine.llm import LLM, LLMEngine
from longserve.engine.request import CompletionOutput, RequestOutput
from longserve.engine.sampling import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
]
