"""kvpool's end-to-end demo: a tiny Llama served with continuous batching over kvpool's paged KV cache.

Run ``python -m kvpool.demo --help``. Modules: :mod:`~kvpool.demo.model` (the decoder, TP-split),
:mod:`~kvpool.demo.scheduler` (continuous batching, prefix sharing, preemption),
:mod:`~kvpool.demo.engine` (one rank: model + kvpool), :mod:`~kvpool.demo.launch` (one or ``tp`` processes),
:mod:`~kvpool.demo.hf_reference` (transformers' ``LlamaForCausalLM`` on the same weights),
:mod:`~kvpool.demo.group_usage` (blocks held per KV-cache group of the hybrid model, ``--model hybrid``).
"""
