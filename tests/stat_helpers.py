"""Shared statistics for the distribution tests (chi-square goodness of fit on sampled token ids)."""

import torch
from scipy import stats


def chisquare_pvalue(samples_idx, probs):
    """p-value of observed ids ``samples_idx`` long [N] against ``probs`` [K]; cells expected <= 5 are pooled."""
    counts = torch.bincount(samples_idx, minlength=probs.numel()).double()
    expected = probs.double() * samples_idx.numel()
    keep = expected > 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
