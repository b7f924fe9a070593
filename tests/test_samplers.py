from samplers import SeededTrainSampler, ShapeBatchSampler, ShardSampler


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


def test_shape_batches_hold_one_size_each_and_cover_every_image_once_over_ranks():
    from samplers import ShapeBatchSampler
    sizes = [(375, 1242), (370, 1224), (375, 1242), (374, 1238), (375, 1242), (370, 1224), (375, 1242)]
    shards = [list(ShapeBatchSampler(sizes, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    batches = shards[0] + shards[1]
    assert all(len({sizes[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert list(ShapeBatchSampler(sizes, batch_size=8, max_pixels=2 * 375 * 1242)) == [[1, 5], [3], [0, 2], [4, 6]]


def test_batched_validation_equals_one_image_at_a_time(synthetic_root):
    import torch
    from torch.utils.data import DataLoader

    from data_preprocessing import KittiSemantics
    from layouts import list_labelled
    from engine import evaluate
    from model import build_model
    dataset = KittiSemantics(synthetic_root, list_labelled(synthetic_root)[:5])
    torch.manual_seed(0)
    net = build_model("fcn16", 19, pretrained=False)
    batched = DataLoader(dataset, batch_sampler=ShapeBatchSampler([(96, 320)] * 5, batch_size=4))
    one_by_one = DataLoader(dataset, 1)
    (confusion_a, loss_a), (confusion_b, loss_b) = (evaluate(net, loader, 19, torch.device("cpu"), show=False)
                                                    for loader in (batched, one_by_one))
    assert len(batched) == 2 and (confusion_a.matrix == confusion_b.matrix).all()
    assert abs(loss_a - loss_b) < 1e-6 * abs(loss_b)
