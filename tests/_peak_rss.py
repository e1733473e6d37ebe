"""Peak resident-memory growth of a snippet, measured in a fresh Python process: the peak during
the snippet (VmHWM, reset just before it) against the resident set before it (VmRSS)."""
import subprocess
import sys
import textwrap

from _triton_device import env_without_interpreter

_TEMPLATE = """
import torch
from dmlkern import losses, miners

def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

{setup}
_before = _kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
{measured}
print((_kib("VmHWM") - _before) / 1024.0)
"""


def peak_rss_growth_mib(setup, measured, env=None, timeout=900):
    """Run `setup`, then `measured` (its assertions included) in a fresh process; the MiB by which
    the peak RSS during `measured` exceeds the RSS before it."""
    script = _TEMPLATE.format(setup=textwrap.dedent(setup), measured=textwrap.dedent(measured))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                         env=env_without_interpreter(**(env or {})))
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])
