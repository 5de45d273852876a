"""DDPG for per-layer compression policies: a pure-PyTorch agent and its Ray Tune searcher (AMC, He et al. 2018)."""
