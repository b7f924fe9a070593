from samplers import SeededTrainSampler, ShardSampler


def test_training_order_is_a_function_of_seed_and_epoch():
    sampler = SeededTrainSampler(20, seed=1)
    sampler.set_epoch(3)
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(4)
    assert [i for i, _ in first] != [i for i, _ in sampler]
    assert sorted(i for i, _ in first) == list(range(20))


def test_ddp_ranks_share_one_permutation_without_overlap_beyond_padding():
    world = 3
    per_rank = [list(SeededTrainSampler(10, seed=0, rank=r, world_size=world)) for r in range(world)]
    assert all(len(items) == 4 for items in per_rank)  # 10 padded to 12
    indices = [i for items in per_rank for i, _ in items]
    assert set(indices) == set(range(10)) and len(indices) == 12


def test_skip_resumes_the_same_sequence_mid_epoch():
    sampler = SeededTrainSampler(16, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, skip=6)
    assert list(sampler) == full[6:] and len(sampler) == 10


def test_shard_sampler_covers_an_odd_split_exactly_once():
    shards = [list(ShardSampler(7, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
