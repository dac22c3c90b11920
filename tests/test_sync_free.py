"""A training step never makes the host wait for the device, and everything lives on the device.

The device is stood in for by `meta`: the CPU side (samplers, augmentation parameters) runs for
real, every device op runs shape-only, and `SyncAudit` records each op that would block the host
on a GPU (a value read back, a data-dependent shape, a host-to-device copy).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_flatten

from ssl_imwa.builders import build_replicas
from ssl_imwa.config import validate
from ssl_imwa.data import build_data
from ssl_imwa.distributed import Communicator, ProcessLayout
from ssl_imwa.sync_audit import SyncAudit
from ssl_imwa.trainer import Replica, Trainer
from tests.utils import compose_config

META = torch.device("meta")
SMALL = ["experiment=quickstart", "train.batch_size=8", "train.mu=2", "train.iterations=100"]
# Warm-ups and periods short enough that the audited steps cross every schedule boundary.
ALGORITHMS = {
    "fixmatch": [],
    "daso": ["algorithm=daso", "algorithm.warmup_steps=2", "algorithm.dist_update_period=3",
             "algorithm.queue_size=4"],
    "acr_paper": ["algorithm=acr", "algorithm.epoch_length=3", "algorithm.estimate_start_epoch=1",
                  "algorithm.follow_official_code=false"],
    "acr": ["algorithm=acr", "algorithm.epoch_length=3", "algorithm.estimate_start_epoch=1"],
    "debiaspl": ["algorithm=debiaspl"],
    "saw": ["algorithm=saw", "algorithm.epoch_length=3"],
    "tras": ["algorithm=tras", "algorithm.warmup=6"],   # the target head joins the loss at step 6
    "darp": ["algorithm=darp", "algorithm.epoch_length=3", "algorithm.warmup_epochs=1", "algorithm.refine_every=3"],   # warm-up 4-5, solver 6 and 9
    "adsh": ["algorithm=adsh", "algorithm.epoch_length=3"],   # the unlabeled pass after steps 5 and 8 is audited too
    "abc": ["algorithm=abc", "algorithm.schedule_epochs=25"],   # 4-step schedule epochs: moves at 4 and 8
    "crest_plus": ["algorithm=crest_plus"],   # the alignment's estimate at every step (the pick is per generation)
    "simpro": ["algorithm=simpro", "algorithm.epoch_length=3"],   # M-steps after 5 and 8
    "cdmad": ["algorithm=cdmad", "algorithm.debias_start=6"],   # the solid image's bias subtracted from step 6
    "cossl": ["algorithm=cossl", "algorithm.warmup=2", "algorithm.classifier_epochs=1", "algorithm.classifier_epoch_steps=2", "algorithm.classifier_batch_size=8"],   # classifier warm-up at the start of step 2, co-learning audited
}
AUDITED_STEPS = range(4, 10)   # DASO refreshes at 5 and 8, ACR starts epochs at 6 and 9, SAW re-weights after 5 and 8


def _meta_replicas(overrides: list[str]) -> tuple[list[Replica], Trainer]:
    cfg = validate(compose_config([*SMALL, *overrides]))
    single = Communicator(device=META)
    replicas, _, _ = build_replicas(cfg, build_data(cfg.dataset), META, ProcessLayout(single, single, single))
    return replicas, Trainer(cfg.train, META)


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(obj)[0] if isinstance(leaf, torch.Tensor)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_steady_state_step_has_no_sync_and_one_copy(name: str) -> None:
    replicas, trainer = _meta_replicas(ALGORITHMS[name])
    (replica,) = replicas
    for step in range(AUDITED_STEPS.start):
        trainer.step(replica, step)
    for step in AUDITED_STEPS:
        with SyncAudit(META) as audit:
            trainer.step(replica, step)
        assert audit.syncs == [], f"step {step}: {audit.sync_lines()}"
        assert 1 <= len(audit.copies_to_device) <= 2, audit.copies_to_device
        assert all(copy.non_blocking for copy in audit.copies_to_device), audit.copies_to_device


@pytest.mark.parametrize("name", ["daso", "acr"])
def test_everything_a_replica_owns_is_on_the_configured_device(name: str) -> None:
    replicas, trainer = _meta_replicas([*ALGORITHMS[name], "imwa.k=2"])
    assert len(replicas) == 2
    for replica in replicas:
        owned = {"model": replica.model.state_dict(), "teacher": replica.teacher.state_dict(),
                 "algorithm": replica.algorithm.state_dict(),
                 "stream": [replica.stream.labeled_images, replica.stream.labeled_targets,
                            replica.stream.unlabeled_images, replica.stream.unlabeled_targets,
                            replica.stream.unlabeled_is_labeled]}
        for part, value in owned.items():
            assert {tensor.device for tensor in _tensors(value)} == {META}, part
        trainer.step(replica, 0)
        momentum = _tensors(replica.optimizer.state_dict()["state"])
        assert momentum and {tensor.device for tensor in momentum} == {META}
    # The K replicas share one resident copy of the images.
    assert replicas[0].stream.unlabeled_images is replicas[1].stream.unlabeled_images
