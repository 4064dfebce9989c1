"""A distributed run streaming its images from disk: each rank augments its rows of the global batch exactly as
one process augments the whole batch (the training loop's own call, in-process: no torchrun)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trainer import data as data_mod
from trainer.augment import AugmentConfig, BatchAugment
from trainer.config import TrainConfig
from trainer.distributed import DistContext
from trainer.engine import TrainBatches, Trainer
from trainer.station_view import StationViewConfig

WORLD, BATCH, STEPS = 2, 16, 2


def _rank_inputs(cfg: TrainConfig, samples: list, rank: int, tmp_path) -> tuple[list, list, list]:
    """What the training loop of ``rank`` fed its model per step, with the canvases and as-seen rows it read."""
    trainer = Trainer(cfg, tmp_path / f"rank{rank}")
    trainer.dist = DistContext(rank=rank, local_rank=rank, world=WORLD)
    generator = torch.Generator().manual_seed(cfg.seed)                     # as Trainer.fit seeds it, on every rank
    augment = BatchAugment(cfg.augment, trainer.spec, generator)
    batches = TrainBatches(samples, trainer.spec, cfg, generator, trainer.dist)
    assert batches.sharded and batches.cached is None                     # streamed, a DistributedSampler share
    batches.set_epoch(0)
    fed, canvases, seen = [], [], []

    def recording(canvas, **kw):
        canvases.append(canvas.clone())
        seen.append(kw["as_seen"].clone())
        fed.append(augment(canvas, **kw))
        return fed[-1]

    side = trainer.spec.height
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer._train_epoch(0, model, batches, recording, optimizer, schedule, scaler, nn.CrossEntropyLoss())
    return fed, canvases, seen


def test_every_streamed_shard_renders_its_rows_exactly_as_the_whole_batch(fmnist_dir, tmp_path):
    # given: a 2-process run that streams its images (not cached), with station views (JPEG off: exact floats) and
    # some rows already a station's view
    samples = data_mod.load_dataset(fmnist_dir / "train", check_images=False).samples[::25][:BATCH * STEPS]
    samples = [dataclasses.replace(s, as_seen=i % 5 == 0) for i, s in enumerate(samples)]
    cfg = TrainConfig(data=str(fmnist_dir / "train"), image_size=32, resize_shorter=32, batch_size=BATCH, seed=3,
                      workers=0, cache_images=False, epochs=1, max_steps_per_epoch=STEPS, device="cpu",
                      augment=AugmentConfig(station_view=StationViewConfig(jpeg=0.0)))
    # when: each rank runs its training loop
    ranks = [_rank_inputs(cfg, samples, rank, tmp_path) for rank in range(WORLD)]
    # then: interleaved (rank r holds rows r, r + world, ... of the global batch), the ranks' canvases make the
    # global batch, and one process augmenting it draws, step after step, what the ranks fed their models
    single = BatchAugment(cfg.augment, Trainer(cfg, tmp_path / "one").spec, torch.Generator().manual_seed(cfg.seed))
    for step in range(STEPS):
        canvas = torch.empty(BATCH, *ranks[0][1][step].shape[1:], dtype=torch.uint8)
        as_seen = torch.empty(BATCH, dtype=torch.bool)
        for rank, (_, canvases, seen) in enumerate(ranks):
            canvas[rank::WORLD], as_seen[rank::WORLD] = canvases[step], seen[step]
        assert not torch.equal(ranks[0][1][step], ranks[1][1][step])      # the ranks read different images
        whole = single(canvas, as_seen=as_seen)
        for rank, (fed, _, _) in enumerate(ranks):
            torch.testing.assert_close(fed[step], whole[rank::WORLD], atol=1e-5, rtol=0)
