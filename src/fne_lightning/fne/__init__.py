"""False Negative Elimination machinery (FNE_SPEC sections 2-6, 10): memory bank, similarity
statistics, negative weights and sampling, true-positive index. Plain PyTorch, no Lightning."""
