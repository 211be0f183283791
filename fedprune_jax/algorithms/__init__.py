"""Federated algorithms over the engine's seam: FedAvg/FedAdam/FedYogi and federated pruning,
plus the mask policy they share with the centralized pruning baseline."""
