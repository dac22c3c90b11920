"""Names that the engine, the resume check, the report and TensorBoard must agree on, kept here once.

Torch-free, so the report (which never imports torch) reads the same lists the engine writes with.
"""

# The scalar metrics of every evaluation, in the order logs, tables and TensorBoard show them.
SUMMARY_METRICS = ("top1", "balanced_acc", "macro_f1", "head", "medium", "tail")

# Keys that say how a run is launched, not what it computes: a resume may change them, a checkpoint's
# fingerprint leaves them out, the report does not split groups by them, and Hydra keeps them out of
# a sweep's directory names (configs/config.yaml's override_dirname.exclude_keys, checked by a test).
LAUNCH_KEYS = ("resume", "run_dir", "device", "train.stop_at", "train.progress", "train.num_threads",
               "train.checkpoint_every", "train.log_every", "imwa.timeout_s", "imwa.keep_merges", "logger")
