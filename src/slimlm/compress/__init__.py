"""Compression: make a model smaller (quantized, pruned, distilled) and write it as a GGUF file
that llama.cpp and Ollama run unchanged.

`blocks` holds llama.cpp's block formats and its round-to-nearest quantizer, so that integer
codes and scales chosen by any method (RTN, GPTQ, AWQ, ternary) become exact GGUF bytes.
"""
