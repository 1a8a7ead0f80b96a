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


def first_two_token_tables(target, prompt):
    """The target's distribution of the first token after ``prompt`` [1, L] (float [V]) and of the first two
    (float [V, V], row = first token), computed cache-free."""
    with torch.no_grad():
        p1 = target(input_ids=prompt).logits[0, -1].double().softmax(-1)  # [V]
        vocab = p1.numel()
        both = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p2 = target(input_ids=both).logits[:, -1].double().softmax(-1)  # [V, V]
    return p1, p1[:, None] * p2
