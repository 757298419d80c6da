"""Progress bars: one style for every long step (training, tokenising, calibration, depth
scores, evaluation), drawn by rank 0 only and on stderr, which the log routing leaves alone."""
from tqdm import tqdm


def bar(total: int, desc: str, show: bool = True, unit: str = "it", **kwargs) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, **kwargs)


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `1h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
