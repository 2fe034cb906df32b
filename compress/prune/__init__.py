"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) and structured removal of heads,
MLP channels and decoder layers."""
