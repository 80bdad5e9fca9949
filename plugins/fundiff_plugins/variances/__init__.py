"""Reverse variances: the variance of p(x_s | x_t) in ancestral steps (survey sec. 4.3.1)."""
