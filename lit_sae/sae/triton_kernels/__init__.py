"""Triton kernels of the fast TopK path (``topk``: exact selection; ``sparse``: the sparse k-path) and the switch that
picks them (``dispatch``). Importing this package does not import Triton; ``topk`` and ``sparse`` do."""
