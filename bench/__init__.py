"""The performance harness of senet-job: `python -m bench` (bench/README.md says what each figure means).

(a) baseline.py  the seed-style step, written apart from the project (PIL, DataLoader, fp32 eager)
    seed.py      the seed notebook's two classes, which the baseline trains
(b) jobrun.py    job.train end to end as a subprocess; (e) launch to first step; (f) its peak RSS; DDP
(c) steps.py     the bare model step: job.loop.train_step on the project's model; (d) the augmentation alone
    worker.py    runs one of (a), (c), (d) in a process of its own; child.py starts and watches children
    common.py    modes, step-time summaries, peak memory, machine facts; report.py ratios, targets, the table
gpu_check.py     the one command for a GPU at hand; gpu_parts.py its parts, each in a process under its own limit
"""
