"""EMA teacher: foreach updates of parameters, a policy for BN buffers, optional warm-up."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

BUFFER_POLICIES = ("copy", "ema")


@dataclass
class EMAConfig:
    decay: float = 0.999
    # decay_t = min(1 - 1/(t+1), decay): early teachers follow the student closely.
    warmup: bool = True
    # 'copy': BN running stats copied from the student (FixMatch, ACR);
    # 'ema': float buffers averaged like parameters (DASO). Integer buffers are always copied.
    buffers: str = "copy"


class EMATeacher:
    """An exponential moving average of a student model, used for evaluation and as a teacher."""

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        if cfg.buffers not in BUFFER_POLICIES:
            raise ValueError(f"algorithm.ema.buffers='{cfg.buffers}': expected one of {', '.join(BUFFER_POLICIES)}")
        if not 0.0 <= cfg.decay < 1.0:
            raise ValueError(f"algorithm.ema.decay={cfg.decay}: expected a value in [0, 1)")
        self.cfg = cfg
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Decay used for the update made after global step `step` (0-based)."""
        if self.cfg.warmup:
            return min(1.0 - 1.0 / (step + 1), self.cfg.decay)
        return self.cfg.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        teacher_params = [p for p in self.module.parameters()]
        student_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(teacher_params, student_params, weight)
        float_teacher, float_student = [], []
        for teacher_buffer, student_buffer in zip(self.module.buffers(), model.buffers()):
            if teacher_buffer.is_floating_point() and self.cfg.buffers == "ema":
                float_teacher.append(teacher_buffer)
                float_student.append(student_buffer)
            else:
                teacher_buffer.copy_(student_buffer)
        if float_teacher:
            torch._foreach_lerp_(float_teacher, float_student, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
