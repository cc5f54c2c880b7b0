"""Compression: make a model smaller (quantized, pruned, distilled) and write it as a GGUF file
that llama.cpp and Ollama run unchanged, or a Hugging Face folder.

`blocks` holds llama.cpp's block formats and its round-to-nearest quantizer, so that integer
codes and scales chosen by any method (RTN, GPTQ, AWQ, ternary) become exact GGUF bytes.

Methods are classes in registries that the library dispatches through and the CLI lists
(`registry.Registry`): quantization methods in `quant_methods/` (QUANT_METHODS, used by
`quantize.quantize`), prune methods in `prune_methods/` (PRUNE_METHODS, used by `prune.prune`).
A new method is one module there plus one import line in that package's `__init__.py`. The
algorithms the method classes drive (gptq, gptq_sequential, awq, ternary, prune_structured,
prune_sparse) share their calibration plumbing through `calibration`, and import nothing from
each other's private names.
"""
