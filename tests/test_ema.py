import torch
from torch import nn

from ssl_imwa.ema import EMAConfig, EMATeacher


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_with_warmup_matches_formula() -> None:
    student = _model()
    teacher = EMATeacher(student, EMAConfig(decay=0.9, warmup=True, buffers="copy"))
    before = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    teacher.update(student, step=1)  # decay = min(1 - 1/2, 0.9) = 0.5
    assert torch.allclose(teacher.module[0].weight, 0.5 * before + 0.5 * student[0].weight)
    assert teacher.decay_at(100) == 0.9 and teacher.decay_at(0) == 0.0


def test_buffer_policies() -> None:
    student = _model()
    copy_teacher = EMATeacher(student, EMAConfig(decay=0.5, warmup=False, buffers="copy"))
    ema_teacher = EMATeacher(student, EMAConfig(decay=0.5, warmup=False, buffers="ema"))
    student.train()
    student(torch.randn(8, 3) * 5 + 3)  # moves BN running stats
    copy_teacher.update(student, 10)
    ema_teacher.update(student, 10)
    bn_student = student[1]
    assert torch.equal(copy_teacher.module[1].running_mean, bn_student.running_mean)
    assert torch.allclose(ema_teacher.module[1].running_mean, 0.5 * bn_student.running_mean)
    # integer buffers are copied under both policies
    assert ema_teacher.module[1].num_batches_tracked.item() == 1


def test_teacher_is_frozen_and_in_eval_mode() -> None:
    teacher = EMATeacher(_model(), EMAConfig())
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
