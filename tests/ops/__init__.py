"""pf_ray/ops: the maths as plain functions (channel groups, pruning, LASSO, MACs budget, quantizers, QAT layers,
codebooks, sparsity, bit allocation, DCP, the INT8 grid), no learner built."""
