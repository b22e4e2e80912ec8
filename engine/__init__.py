"""The serving engine: continuous batching over a paged KV cache.

- ``types``: the public data (SamplingParams, RequestOutput, EngineStats, errors).
- ``config``: EngineConfig.
- ``sequence``: one request's state.
- ``block_manager``: two reference-counted block pools (full-attention and sliding-window
  layers) and the prefix cache over both.
- ``scheduler``: decodes first, then chunked prefills, FCFS admission, preemption.
- ``model_runner``: a scheduled step -> one flattened forward pass (model.batch.BatchMetadata).
- ``sampler``: batched sampling with per-request parameters and seeds.
- ``llm_engine``: the synchronous core (add_request / step / abort).
- ``async_engine``: the engine loop in its own thread with an asyncio interface.
"""
