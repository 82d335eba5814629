"""The figures derived from the parts (ratios, launch, memory, targets) and the markdown table."""

# The issue's targets on the 2-core CPU: benchmark figures to read, never test assertions.
TARGETS = {"job_vs_baseline": 1.2, "job_vs_baseline_stretch": 1.3, "job_vs_bare_step": 0.95,
           "augment_images_per_sec": 40000, "launch_to_train_start_s": 10.0}


def ips(result: dict | None) -> str:
    """'123.4 img/s', or why there is no number."""
    if not result:
        return "-"
    if "images_per_sec" in result:
        return f"{result['images_per_sec']:.1f} img/s"
    return result.get("skipped") or result.get("error") or "-"


def _get(doc: dict, *keys):
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _ratio(a, b):
    return a / b if a and b else None


def derived(doc: dict) -> dict:
    """launch (e), memory (f), and per-mode ratios with the targets, from the measured parts."""
    modes = doc["settings"]["modes"]
    base = _get(doc, "baseline", "images_per_sec")
    job = {m: _get(doc, "job", m) or {} for m in modes}
    bare = {m: _get(doc, "bare_step", m) or {} for m in modes}
    launch = {m: {k: job[m][k] for k in ("launch_to_train_start_s", "first_step_s_estimate",
                                         "launch_to_first_step_done_s", "launch_to_first_step_s") if k in job[m]}
              for m in modes if "wall_s" in job[m]}
    memory = {"baseline_peak_rss_mib": _get(doc, "baseline", "peak_rss_mib"),
              "augment_peak_rss_mib": _get(doc, "augment", "peak_rss_mib"),
              "job_peak_rss_mib": {m: job[m].get("peak_rss_mib") for m in modes if "peak_rss_mib" in job[m]},
              "bare_step_peak_rss_mib": {m: bare[m].get("peak_rss_mib") for m in modes if "peak_rss_mib" in bare[m]},
              "bare_step_cuda_max_allocated_mib": {m: bare[m]["cuda_max_allocated_mib"] for m in modes
                                                   if "cuda_max_allocated_mib" in bare[m]} or None,
              "job_cuda_max_allocated_mib": None}  # job.train does not report it (bench/README.md)
    ratios = {m: {"job_vs_baseline": _ratio(job[m].get("images_per_sec"), base),
                  "job_vs_bare_step": _ratio(job[m].get("images_per_sec"), bare[m].get("images_per_sec")),
                  "bare_step_vs_baseline": _ratio(bare[m].get("images_per_sec"), base)} for m in modes}
    with_job = [m for m in modes if job[m].get("images_per_sec")]
    best = max(with_job, key=lambda m: job[m]["images_per_sec"]) if with_job else None
    no_compile = [launch[m].get("launch_to_first_step_s") or launch[m]["launch_to_train_start_s"] for m in launch
                  if "compile" not in m and launch[m]["launch_to_train_start_s"] is not None]
    summary = {"fastest_job_mode": best,
               "job_vs_baseline": ratios[best]["job_vs_baseline"] if best else None,
               "job_vs_bare_step": ratios[best]["job_vs_bare_step"] if best else None,
               "augment_images_per_sec": _get(doc, "augment", "images_per_sec"),
               "launch_to_train_start_s_without_compile": min(no_compile) if no_compile else None,
               "targets": TARGETS}
    return {"launch": launch, "memory": memory, "ratios": ratios, "summary": summary}


def errors(doc: dict) -> list[str]:
    """Where a part failed: 'job.compile: job.train exited 1', ..."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if "error" in node:
                found.append(f"{path}: {node['error']}")
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)

    walk({k: doc.get(k) for k in ("baseline", "augment", "bare_step", "job", "ddp")}, "")
    return found


def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(doc: dict) -> str:
    """The table of modes, then one paragraph per other part, the targets, and any failures."""
    lines = _header(doc) + _mode_table(doc) + _baseline(doc) + _augment(doc) + _ddp(doc) + _targets(doc)
    errs = errors(doc)
    if errs:
        lines += ["", "**Failed parts** (log tails in the JSON): " + "; ".join(errs)]
    return "\n".join(lines)


def _header(doc: dict) -> list[str]:
    m, s = doc["machine"], doc["settings"]
    machine = (f"{m['cpu']} ({m['cpus_usable']} CPUs), {m['cuda_device'] or 'no GPU'}; torch {m['torch']}, "
               f"{m['torch_threads']} threads (OMP_NUM_THREADS={m['omp_num_threads_env'] or 'unset'}); "
               f"device {s['device']}; load average {m['load_average_at_start'][0]:.2f} -> "
               f"{m['load_average_at_end'][0]:.2f}")
    if s["quick"]:
        machine += "; QUICK: sizes too small to mean anything"
    sizes = (f"batch {s['batch']}; {s['steps']} steps timed after {s['warmup']} warm-up (job.train: {s['epochs']} "
             f"epochs of {s['steps']} steps, the median epoch after the first)")
    return [f"## senet-job benchmark, {doc['date']}", "", machine, "", sizes]


def _mode_table(doc: dict) -> list[str]:
    lines = ["", ("| mode | job.train img/s | bare step img/s | job / bare | job / baseline | launch to train s "
                  "| launch to 1st step done s | job RSS MiB | bare RSS MiB |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode in doc["settings"]["modes"]:
        job, bare = _get(doc, "job", mode) or {}, _get(doc, "bare_step", mode) or {}
        r = _get(doc, "ratios", mode) or {}
        job_ips = _f(job.get("images_per_sec")) if "images_per_sec" in job else ("n/a" if "skipped" in job else "-")
        cells = [mode, job_ips, _f(bare.get("images_per_sec")), _f(r.get("job_vs_bare_step"), ".2f"),
                 _f(r.get("job_vs_baseline"), ".2f"), _f(job.get("launch_to_train_start_s")),
                 _f(job.get("launch_to_first_step_done_s")), _f(job.get("peak_rss_mib"), ".0f"),
                 _f(bare.get("peak_rss_mib"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _baseline(doc: dict) -> list[str]:
    base = doc.get("baseline")
    if not base:
        return []
    runs = ", ".join(f"{k}: {ips(v)}, loader alone {_f(v.get('loader_images_per_sec'), '.0f')} img/s"
                     for k, v in base.get("runs", {}).items())
    return ["", (f"**(a) baseline** (seed model, PIL + DataLoader, fp32 eager NCHW, plain SGD): {ips(base)} with "
                 f"{base.get('best', '?')} ({runs}); peak RSS {_f(base.get('peak_rss_mib'), '.0f')} MiB")]


def _augment(doc: dict) -> list[str]:
    aug = doc.get("augment")
    if not aug:
        return []
    return ["", (f"**(d) augmentation** (batch {doc['settings']['augment_batch']}): augment + normalize {ips(aug)}; "
                 f"the job's whole per-step data path (gather, a Generator per step, augment, normalize) "
                 f"{_f(aug.get('job_data_path_images_per_sec'), '.0f')} img/s; epoch_indices(45000) "
                 f"{_f(aug.get('epoch_indices_s_at_45000'), '.3f')} s per epoch; with malloc_cache: augment + "
                 f"normalize {ips(aug.get('malloc_cache'))}, the job's data path "
                 f"{_f(_get(aug, 'malloc_cache', 'job_data_path_images_per_sec'), '.0f')} img/s")]


def _ddp(doc: dict) -> list[str]:
    ddp = doc.get("ddp")
    if not ddp:
        return []
    lines = ["", f"**DDP on the CPU** ({ddp['mode']}, global batch {doc['settings']['batch']}, gloo):", "",
             "| launch | img/s (all ranks) | launch to train s | peak RSS MiB (largest process) |",
             "| --- | ---: | ---: | ---: |"]
    for name, run in ddp["runs"].items():
        cells = [name, _f(run.get("images_per_sec")), _f(run.get("launch_to_train_start_s")),
                 _f(run.get("peak_rss_mib"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", (f"2 processes x 1 thread vs 1 x 2 threads: {_f(ddp.get('speedup_2proc_vs_1proc_2threads'), '.2f')}x;"
                   f" vs 1 x 1 thread: {_f(ddp.get('speedup_2proc_vs_1proc_1thread'), '.2f')}x; "
                   f"2 threads vs 1: {_f(ddp.get('speedup_2threads_vs_1thread'), '.2f')}x")]
    return lines


def _targets(doc: dict) -> list[str]:
    sm, t = doc.get("summary", {}), TARGETS
    return ["", (f"**Targets** (figures, not assertions): fastest job mode {sm.get('fastest_job_mode')}: "
                 f"job / baseline {_f(sm.get('job_vs_baseline'), '.2f')} (target {t['job_vs_baseline']}, "
                 f"stretch {t['job_vs_baseline_stretch']}); job / bare step {_f(sm.get('job_vs_bare_step'), '.2f')} "
                 f"(target >= {t['job_vs_bare_step']}); augmentation "
                 f"{_f(sm.get('augment_images_per_sec'), '.0f')} img/s (target {t['augment_images_per_sec']}); "
                 f"launch to train without compile {_f(sm.get('launch_to_train_start_s_without_compile'))} s "
                 f"(target <= {t['launch_to_train_start_s']})")]
