"""The searchers without a Ray cluster: the contract every searcher keeps, GP, DDPG, cluster-sized concurrency."""
