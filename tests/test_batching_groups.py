"""Prefill groups (batching.Scheduler._admit): requests prefilled together are left-padded to
the group's longest prompt, so a request joins a group only while the group's padded positions
stay within MAX_PAD_WASTE times its real prompt tokens; one that would break it leads the next
group (first come, first served still). The groups are read off the batches the runner's
prefill received; every request's tokens are checked against transformers' greedy generate."""

from __future__ import annotations

import threading

import pytest
from test_batching import TIMEOUT, _hf_greedy, _prompts

from mamba_deploy import load_model
from mamba_deploy.batching import MAX_PAD_WASTE, MAX_PREFILLS, Scheduler
from mamba_deploy.runners.torch_runner import TorchRunner


class _Prefills(TorchRunner):
    """Records (rows, positions) of every prefill call."""

    def __init__(self, model):
        super().__init__(model)
        self.prefills = []

    def prefill(self, ids, state, **kw):
        self.prefills.append(tuple(ids.shape))
        return super().prefill(ids, state, **kw)


# submitted in this order before the loop runs: prompt lengths of each request, new tokens
REQUESTS = [((60,), 6), ((1,), 9), ((7,), 5), ((5, 9), 7), ((50,), 4), ((60,), 8)]
# MAX_PAD_WASTE 1.5: 60 alone (60 + 1: 120 padded positions for 61 tokens); 1 alone (1 + 7: 14
# for 8); 7 with [5, 9] (27 for 21; with 50 too: 200 for 71); 50 with 60 (120 for 110).
# Before the rule, all six requests were one group: 7 rows x 60 positions (420).
GROUPS = [(1, 60), (1, 1), (3, 9), (2, 60)]
# The order they are fed in: MAX_PREFILLS (2) groups at a time, the one with the fewest positions
# left first. Turn 1 admits 60 and 1 and feeds 1; turn 2 admits [7], [5, 9] beside 60 and feeds
# it; turn 3 admits 50 + 60 and feeds the older 60 (equal positions left); turn 4 the last.
# Before MAX_PREFILLS, one group at a time in GROUPS' order: 1-token prompts waited for 60.
FED = [(1, 1), (3, 9), (1, 60), (2, 60)]


def _run(runner, chunk, request):
    """REQUESTS through a Scheduler whose loop starts after all are submitted -> (prompts per
    request, tokens per request)."""
    sched = Scheduler(runner, max_rows=16, prefill_chunk=chunk, thread=False)
    request.addfinalizer(lambda: sched.close(TIMEOUT))
    prompts, jobs = [], []
    for i, (lengths, n) in enumerate(REQUESTS):
        prompts.append(_prompts(lengths, seed=10 + i))
        jobs.append(sched.submit(prompts[-1], max_new_tokens=n, stop_token_ids=[]))
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()
    got = [job.follow().tokens for job in jobs]
    sched.stop()
    loop.join(TIMEOUT)
    return prompts, got


def _check_tokens(hf, prompts, got):
    for (lengths, n), ps, tokens in zip(REQUESTS, prompts, got):
        assert tokens == [_hf_greedy(hf, p, n) for p in ps], f"request of prompt lengths {lengths}"


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_a_long_prompt_neither_pulls_short_ones_in_nor_joins_them(kind, hf_checkpoint, request):
    """A long request first is prefilled alone, the short ones after it go together as far as
    the bound allows, and the long ones after them lead a group of their own: the runner sees
    GROUPS (in one piece each: prefill_chunk None), the short groups fed first (FED), and every
    row decodes transformers' tokens."""
    assert MAX_PAD_WASTE == 1.5 and MAX_PREFILLS == 2, "GROUPS and FED above were worked out for these"
    folder, hf = hf_checkpoint(kind)
    runner = _Prefills(load_model(folder))
    prompts, got = _run(runner, None, request)
    assert sorted(runner.prefills) == sorted(GROUPS)
    assert runner.prefills == FED
    _check_tokens(hf, prompts, got)


def test_groups_fed_in_pieces_feed_only_their_own_padding(hf_checkpoint, request):
    """With prefill_chunk 16 the same groups go in pieces: the positions fed (rows x piece
    width, summed) are the groups' (60 + 1 + 27 + 120), not 7 rows x 60, and the short groups
    go in before the first long one's pieces; tokens as transformers'."""
    folder, hf = hf_checkpoint("mamba2")
    runner = _Prefills(load_model(folder))
    prompts, got = _run(runner, 16, request)
    assert max(w for _, w in runner.prefills) <= 16
    assert sum(r * w for r, w in runner.prefills) == sum(r * w for r, w in GROUPS) == 208
    assert [r for r, _ in runner.prefills] == [1] + [3] + [1] * 4 + [2] * 4
    _check_tokens(hf, prompts, got)


def test_a_second_group_beside_a_long_one_only_if_it_goes_in_one_piece(hf_checkpoint, request):
    """prefill_chunk 16; prompts of 60, 19 and 1 tokens submitted in that order (19 would pad past
    MAX_PAD_WASTE beside 60, and takes two pieces). The 19-token request may not start beside the
    60-token one (two groups of several pieces each would split prompts that could go in
    together); it leads once 60 is in, and the 1-token one, one piece, goes in beside it and first.
    The runner sees 60's four pieces, then 1, then 19's two."""
    folder, hf = hf_checkpoint("mamba")
    runner = _Prefills(load_model(folder))
    sched = Scheduler(runner, max_rows=16, prefill_chunk=16, thread=False)
    request.addfinalizer(lambda: sched.close(TIMEOUT))
    prompts = [_prompts((n,), seed=30 + n)[0] for n in (60, 19, 1)]
    jobs = [sched.submit([p], max_new_tokens=3, stop_token_ids=[]) for p in prompts]
    loop = threading.Thread(target=sched.run, daemon=True)
    loop.start()
    got = [job.follow().tokens[0] for job in jobs]
    sched.stop()
    loop.join(TIMEOUT)
    assert runner.prefills == [(1, 16)] * 3 + [(1, 12)] + [(1, 1)] + [(1, 16), (1, 3)]
    assert got == [_hf_greedy(hf, p, 3) for p in prompts]
