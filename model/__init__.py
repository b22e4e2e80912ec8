"""The gpt-oss transformer in PyTorch.

- ``model.config.ModelConfig`` / ``PRESETS`` ("tiny", "small", "20b", "120b"); ``ModelConfig.from_dir``.
- ``model.loader.load_model(path, dtype, device, dequantize_experts, progress, kernels) -> GptOssModel``:
  HF layout (packed MXFP4 or the dequantized bf16 export) and the original layout, memory-mapped.
- ``model.kernels``: the ops the forward pass runs, their backends (``reference``, ``native-cpu``)
  and ``select_kernels`` (``auto``: by device and CPU features, self-checked at load).
- ``GptOssModel.forward(input_ids [T], meta: model.batch.BatchMetadata, kv_cache) -> logits``.
- ``model.kv_cache.KVCache``: the paged cache (full and sliding pools), ``bytes_per_block``.
- ``model.checkpoint.make_checkpoint``: random checkpoints in the published layouts.
- ``model.generate.greedy_generate``: single-sequence greedy decoding through the cache.
- ``python -m model make-checkpoint|generate``.
"""
