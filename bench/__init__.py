"""The performance harness of senet-job: `python -m bench` (bench/README.md says what each figure means).

(a) baseline.py  the seed-style step, written apart from the project (PIL, DataLoader, fp32 eager)
(b) jobrun.py    job.train end to end as a subprocess; (e) launch to first step; (f) its peak RSS; DDP
(c) steps.py     the bare model step with the project's model and optimizer; (d) the augmentation alone
    worker.py    runs one of (a), (c), (d) in a process of its own; child.py starts and watches children
    common.py    modes, step timing, peak memory, machine facts; report.py ratios, targets, the table
"""
