"""instar: grow a small language model through every stage of its training, offline.

Generate data with a local LLM, then carry a model through random init, pretraining, instruction
fine-tuning, preference fine-tuning and reasoning fine-tuning. Heavy libraries (torch, transformers,
llama_cpp) are imported lazily by the modules that need them, so `instar --help` starts fast.
"""

__version__ = "0.1.0"


def choose_openmp_wait_policy(llama_cpp: bool = False) -> str:
    """Set OMP_WAIT_POLICY before torch or llama.cpp loads libgomp (one copy per process, which reads it once);
    a value the user set is kept. Returns the policy in force.

    PASSIVE (idle OpenMP threads sleep) whenever llama.cpp will run in this process: with spinning threads its
    first grammar-constrained call stalled 10-200 s in 11 of 12 fresh processes (FIELD-NOTES). For torch alone it
    depends on the machine, measured on GRPO steps here (2 cores, 2 threads): on a quiet machine spinning is 1.6x
    faster (0.15 vs 0.245 s/step), with one other busy process PASSIVE is 2.2x faster (0.26 vs 0.56), with two
    2.4x (0.28 vs 0.68). So: PASSIVE unless the CPU is idle now (`_cpu_busy`)."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ and (llama_cpp or _cpu_busy()):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "default")


def _cpu_busy(window: float = 0.2) -> bool:
    """Other processes use more than a quarter of a core over `window` seconds (Linux /proc/stat; elsewhere
    the 1-minute load average against the same quarter core)."""
    import os
    import time

    def idle_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    cores = os.cpu_count() or 1
    try:
        i0, t0 = idle_total()
        time.sleep(window)
        i1, t1 = idle_total()
        used = cores * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        used = os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    return used > 0.25
