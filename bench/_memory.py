"""This process's resident memory, read from Linux's /proc: what the benchmarks that measure
extra memory per rank compare before and after the work they measure."""


def resident(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def reset_peak() -> None:
    """Make VmHWM start again from what is resident now."""
    with open("/proc/self/clear_refs", "w") as refs:  # "5": reset the peak resident size
        refs.write("5")
