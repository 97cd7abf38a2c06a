"""How a token stream is cut into windows (no training)."""

import torch

from lmlab.data.batching import TokenStream


def test_windows_cover_the_columns_and_targets_are_the_next_tokens():
    tokens = torch.arange(103)
    stream = TokenStream(tokens, batch_size=4, bptt=6)
    assert stream.columns.shape == (25, 4)  # 103 // 4 rows; the 3 left over are dropped
    windows = list(stream.windows())
    assert len(windows) == stream.num_windows() == 4  # 24 predictable steps in windows of 6
    for window in windows:
        assert torch.equal(window.targets[:-1], window.inputs[1:])
    joined = torch.cat([w.inputs for w in windows])
    assert torch.equal(joined, stream.columns[:24])
    assert torch.equal(windows[-1].targets[-1], stream.columns[24])
    assert len(list(stream.windows(limit=2))) == stream.num_windows(limit=2) == 2


def test_shards_split_the_columns_between_ranks():
    stream = TokenStream(torch.arange(200), batch_size=4, bptt=5)
    shards = [stream.shard(rank, 2) for rank in range(2)]
    assert [s.batch_size for s in shards] == [2, 2]
    assert torch.equal(torch.cat([s.columns for s in shards], dim=1), stream.columns)


def test_variable_windows_are_the_same_for_the_same_epoch():
    stream = TokenStream(torch.arange(2000), batch_size=2, bptt=10, variable_bptt=True)
    lengths = [[w.inputs.size(0) for w in stream.windows(epoch)] for epoch in (1, 1, 2)]
    assert lengths[0] == lengths[1] != lengths[2]
    assert sum(lengths[0]) == stream.columns.size(0) - 1
