"""Per-class counts of the long-tailed profiles (the CIFAR-LT protocol of DASO and ACR)."""


def long_tailed_counts(head: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile N_i = int(head * imbalance ** (-i / (C - 1))); class 0 is the head.

    The formula is kept literally (not rewritten as powers of 1/imbalance) so the integer
    truncation matches the published check values bit for bit.
    """
    if head < 0:
        raise ValueError(f"head count must be >= 0, got {head}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if imbalance < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {imbalance} (a rising profile is the 'reversed' setting)")
    if num_classes == 1:
        return [int(head)]
    return [int(head * imbalance ** (-i / (num_classes - 1))) for i in range(num_classes)]


def unlabeled_counts(
    setting: str,
    head: int,
    num_classes: int,
    imbalance_l: float,
    imbalance_u: float | None = None,
) -> list[int]:
    """Unlabeled per-class counts for a distribution setting (the CIFAR-LT protocol of DASO and ACR).

    'unknown' has no per-class counts (its labels are never read), so the builder handles it.
    """
    if setting == "consistent":
        return long_tailed_counts(head, num_classes, imbalance_l)
    if setting == "uniform":
        return long_tailed_counts(head, num_classes, 1.0)
    if setting == "reversed":
        return long_tailed_counts(head, num_classes, imbalance_l)[::-1]
    if setting == "custom":
        if imbalance_u is None:
            raise ValueError("dataset.imbalance_u must be set when dataset.unlabeled='custom'")
        return long_tailed_counts(head, num_classes, imbalance_u)
    if setting == "unknown":
        raise ValueError("unlabeled setting 'unknown' has no per-class counts; build_data handles it")
    raise ValueError(f"unlabeled setting {setting!r}: expected one of consistent, uniform, reversed, custom")
