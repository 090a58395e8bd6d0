"""File I/O shared by every writer: safetensors headers and shard rewriting (``safetensors``), whole
weight sets (``weights``), checkpoint and pipeline directories (``tree``), atomic outputs
(``output``) and the provenance written beside the weights (``provenance``). Nothing here knows
about models or architectures beyond tensor names."""
