"""Mixture of experts: make one from a dense model (upcycle), train it back, look inside (stats),
and make an existing one smaller (prune).

- blocks.py: the one place that knows how transformers lays out a sparse MoE block in memory;
- upcycle.py, partition.py: a dense model to Mixtral (llama/mistral parents) or Qwen-MoE (Qwen 2);
- losses.py: the load-balancing and router z-losses;
- recover.py: training the upcycled model back towards its parent;
- stats.py, prune.py: routing statistics and expert pruning/merging.
"""
