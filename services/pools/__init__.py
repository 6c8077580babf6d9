"""Model pools: the ``Engine`` protocol and its engines (transformers, vllm, openai), the tiny
local chat models, and the pool deployment that serves engines by model id."""
